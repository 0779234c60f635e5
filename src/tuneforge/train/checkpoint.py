"""Checkpoints: adapter (PEFT format) or a full finetune's trainable weights, optimizer, scheduler,
RNG states and the data position.

A checkpoint is written into a hidden ``.tmp-*`` folder, every file and the folder are fsynced,
and only then is it renamed into place: a crash or a full disk while saving never leaves a
checkpoint that looks complete but is not, and never costs the previous one. Stale ``.tmp-*``
folders of a crashed save are removed when the next run starts.

Everything in ``trainer_state.pt`` is a tensor or a plain value (RNG states included), so it loads
with ``torch.load(weights_only=True)``: resuming a run folder from elsewhere cannot run code.
"""

from __future__ import annotations

import errno
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
TEMP_PREFIX = ".tmp-"


class CheckpointError(TuneforgeError):
    """A checkpoint cannot be written or read."""


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
    """Every RNG the loop draws from, as tensors and plain numbers (loadable with weights_only=True)."""
    version, internal, gauss = random.getstate()
    kind, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    states = {
        "torch": torch.get_rng_state(),
        "python": {"version": version, "internal": torch.tensor(internal, dtype=torch.int64), "gauss": gauss},
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "position": int(position),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)},
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    python = states["python"]
    random.setstate((python["version"], tuple(int(v) for v in python["internal"].tolist()), python["gauss"]))
    numpy = states["numpy"]
    np.random.set_state((numpy["kind"], numpy["keys"].numpy().astype(np.uint32), numpy["position"],
                         numpy["has_gauss"], numpy["cached_gaussian"]))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def save_checkpoint(run_dir: Path, model: nn.Module, adapter_name: str, optimizer, scheduler,
                    state: TrainState, keep: int, base_model_name: str | None = None, hooks=None,
                    extra: dict | None = None, full_weights=None) -> Path:
    """Write ``checkpoints/step-NNNNNNN`` atomically; on any OSError (a full disk) raise one
    CheckpointError and leave the earlier checkpoints as they were. ``full_weights`` (a full finetune's
    ``train.full.FullWeights``) is saved in ``weights/`` in place of the adapter."""
    root = run_dir / CHECKPOINTS
    final = root / f"step-{state.step:07d}"
    tmp = root / f"{TEMP_PREFIX}step-{state.step:07d}-{os.getpid()}"

    def write() -> None:
        shutil.rmtree(tmp, ignore_errors=True)
        if full_weights is not None:
            full_weights.save(tmp / "weights")
        else:
            save_adapter(model, tmp / "adapter", adapter_name, base_model_name=base_model_name)
        torch.save({"optimizer": optimizer.state_dict(), **_run_state(scheduler, state, hooks, extra)}, tmp / STATE_FILE)

    _write_and_commit(tmp, final, keep, write)
    return final


def save_sharded_checkpoint(run_dir: Path, model: nn.Module, optimizer, scheduler, state: TrainState, keep: int,
                            is_main: bool, hooks=None, extra: dict | None = None) -> Path | None:
    """FSDP: every rank writes its shards of the weights and optimizer into ``sharded/`` (DCP, see
    sharded_checkpoint.py); rank 0 writes the rest and renames the folder into place, as above."""
    import torch.distributed as dist

    from tuneforge.train.sharded_checkpoint import SHARDED, save_sharded

    root = run_dir / CHECKPOINTS
    final = root / f"step-{state.step:07d}"
    tmp = root / f"{TEMP_PREFIX}step-{state.step:07d}-sharded"  # one name every rank agrees on
    if is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    save_sharded(tmp / SHARDED, model, optimizer)  # returns once every rank's shards and the index are written
    if is_main:
        _write_and_commit(tmp, final, keep, lambda: torch.save(_run_state(scheduler, state, hooks, extra), tmp / STATE_FILE))
    dist.barrier()  # no rank moves on (or saves again) before the folder is in place
    return final if is_main else None


def _run_state(scheduler, state: TrainState, hooks, extra: dict | None) -> dict:
    """Everything but the weights and optimizer that a resumed run needs."""
    return {"scheduler": scheduler.state_dict(), "rng": rng_states(), "state": asdict(state),
            "hooks": hooks.state_dict() if hooks is not None else {}, **(extra or {})}


def _write_and_commit(tmp: Path, final: Path, keep: int, write) -> None:
    """Run ``write`` (fills ``tmp``), fsync, rename ``tmp`` to ``final``, prune old checkpoints; on any
    OSError (a full disk) remove ``tmp``, leave earlier checkpoints as they were and raise CheckpointError."""
    root = final.parent
    try:
        write()
        fsync_tree(tmp)
        replace_dir(tmp, final)
        _fsync_path(root)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(_save_failure(final, root, exc)) from None
    _prune(root, keep)


def _save_failure(final: Path, root: Path, exc: OSError) -> str:
    reason = "the disk is full" if exc.errno == errno.ENOSPC else (exc.strerror or str(exc))
    earlier = [p for p in list_checkpoints(root.parent) if p != final]
    kept = f"the previous checkpoint {earlier[-1]} is kept" if earlier else "no earlier checkpoint exists"
    return (f"could not save checkpoint {final.name} in {root}: {reason}; {kept}. "
            "Free space (or set training.keep_checkpoints lower) and continue with --resume.")


def replace_dir(tmp: Path, final: Path) -> None:
    """Rename ``tmp`` to ``final``; an existing ``final`` (same step saved again) is set aside first
    and removed only once the new one is in place."""
    if not final.exists():
        os.replace(tmp, final)
        return
    aside = final.with_name(f"{TEMP_PREFIX}replaced-{final.name}-{os.getpid()}")
    os.replace(final, aside)
    os.replace(tmp, final)
    shutil.rmtree(aside, ignore_errors=True)


def fsync_tree(folder: Path) -> None:
    """Flush every file, then every folder, under ``folder`` to disk: a rename is only atomic for
    data that has reached the disk (ext4 and xfs may otherwise commit the rename first)."""
    for directory, _, files in os.walk(folder):
        for name in files:
            _fsync_path(Path(directory) / name)
    for directory, _, _ in os.walk(folder, topdown=False):
        _fsync_path(Path(directory))


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_stale_temp_dirs(run_dir: Path) -> list[Path]:
    """Delete the ``.tmp-*`` folders (of a checkpoint or the final adapter) left by a save that
    crashed; returns what was removed."""
    run_dir = Path(run_dir)
    stale = sorted([*run_dir.glob(f"{TEMP_PREFIX}*"), *(run_dir / CHECKPOINTS).glob(f"{TEMP_PREFIX}*")])
    for path in stale:
        shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
    return stale


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


def read_trainer_state(path: Path) -> dict:
    """``trainer_state.pt`` of checkpoint ``path``, loaded with weights_only=True (tensors and plain
    values only, so a file from elsewhere cannot run code)."""
    try:
        return torch.load(path / STATE_FILE, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable or unsafe file gets the same advice
        raise CheckpointError(
            f"checkpoint {path} cannot be read safely ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}). "
            "tuneforge loads only tensors and plain values from checkpoints; delete this checkpoint to resume "
            "from the one before, or start again with --overwrite."
        ) from None


def load_checkpoint(path: Path, model: nn.Module, adapter_name: str, optimizer, scheduler, hooks=None,
                    full_weights=None) -> tuple[TrainState, dict]:
    """Restore everything saved at ``path``; returns the train state and the whole saved dict."""
    from tuneforge.train.sharded_checkpoint import SHARDED, is_sharded, load_sharded

    saved = read_trainer_state(path)
    if (path / SHARDED).is_dir():  # written under FSDP: resumes on any world size, sharded or not
        load_sharded(path / SHARDED, model, optimizer)
    elif is_sharded(model):
        _load_whole_checkpoint_into_shards(path, saved, model, optimizer, full_weights)
    else:
        if full_weights is not None:
            full_weights.load(path / "weights")
        else:
            load_adapter_weights(model, path / "adapter", adapter_name)
        optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    restore_rng_states(saved["rng"])
    if hooks is not None:
        hooks.load_state_dict(saved.get("hooks", {}))
    return TrainState(**saved["state"]), saved


def _load_whole_checkpoint_into_shards(path: Path, saved: dict, model: nn.Module, optimizer, full_weights) -> None:
    """A checkpoint of one process (or of DDP) resumed under FSDP."""
    from tuneforge.train.full import WEIGHTS_FILE, load_weights_file
    from tuneforge.train.sharded_checkpoint import load_whole_into_shards, trainable_names

    if full_weights is None:
        raise CheckpointError(f"{path} holds an adapter saved by one process (or DDP); under FSDP only full-finetuning "
                              "checkpoints of one process resume. Resume it with distributed.strategy: ddp")
    weights = load_weights_file(path / "weights", trainable_names(model))
    try:
        load_whole_into_shards(weights, saved["optimizer"], model, optimizer)
    except (RuntimeError, ValueError, KeyError) as exc:
        raise CheckpointError(f"{path / 'weights' / WEIGHTS_FILE} does not fit this model ({str(exc).splitlines()[0][:300]}): "
                              "it belongs to another model; resume it with the config it was trained with") from None
