"""Checkpoints: adapter (PEFT format), optimizer, scheduler, RNG states and the data position.

Each checkpoint is written into a hidden temp directory and renamed into place, so a crash while
saving never leaves a checkpoint that looks complete but is not.
"""

from __future__ import annotations

import os
import random
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from tuneforge.adapters.peft_format import load_adapter_weights, save_adapter
from tuneforge.errors import TuneforgeError

CHECKPOINTS = "checkpoints"
STATE_FILE = "trainer_state.pt"


@dataclass
class TrainState:
    """Everything the loop needs to continue exactly where it stopped."""

    step: int = 0  # optimizer steps done
    epoch: int = 0
    batch_index: int = 0  # micro-batches of `epoch` already consumed
    tokens_seen: int = 0
    elapsed_seconds: float = 0.0
    best_eval_loss: float | None = None
    evals_without_improvement: int = 0
    history: list[dict] = field(default_factory=list)  # eval results, for the summary


def rng_states() -> dict:
    states = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def save_checkpoint(run_dir: Path, model: nn.Module, adapter_name: str, optimizer, scheduler,
                    state: TrainState, keep: int, base_model_name: str | None = None, hooks=None) -> Path:
    root = run_dir / CHECKPOINTS
    final = root / f"step-{state.step:07d}"
    tmp = root / f".tmp-step-{state.step:07d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    save_adapter(model, tmp / "adapter", adapter_name, base_model_name=base_model_name)
    torch.save({
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": rng_states(),
        "state": asdict(state),
        "hooks": hooks.state_dict() if hooks is not None else {},
    }, tmp / STATE_FILE)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _prune(root, keep)
    return final


def _prune(root: Path, keep: int) -> None:
    for old in list_checkpoints(root.parent)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def list_checkpoints(run_dir: Path) -> list[Path]:
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    done = [p for p in root.iterdir() if p.name.startswith("step-") and (p / STATE_FILE).is_file()]
    return sorted(done, key=lambda p: int(p.name.split("-")[1]))


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def load_checkpoint(path: Path, model: nn.Module, adapter_name: str, optimizer, scheduler, hooks=None) -> TrainState:
    try:
        saved = torch.load(path / STATE_FILE, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001 - any unreadable file gets the same advice
        raise TuneforgeError(f"checkpoint {path} cannot be read ({exc}); delete it to resume from the one before") from None
    load_adapter_weights(model, path / "adapter", adapter_name)
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    restore_rng_states(saved["rng"])
    if hooks is not None:
        hooks.load_state_dict(saved.get("hooks", {}))
    return TrainState(**saved["state"])
