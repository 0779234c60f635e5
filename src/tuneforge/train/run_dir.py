"""The run directory: refuse to clobber an earlier run unless asked, and record the resolved config.

Two phases, so a failed start never costs an earlier run:

1. ``check_run_dir`` (before anything loads): an earlier run needs ``--resume`` or ``--overwrite``;
   ``--resume`` compares the resolved config with the one the run was started with.
2. ``claim_run_dir`` (once config, data and model are loaded): an overwritten run is renamed aside
   into ``.replaced-*``, and removed by ``discard_replaced_runs`` only after the new run's first
   checkpoint or its end.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any

import yaml

from tuneforge.config.schema import TrainConfig, parse_train_config
from tuneforge.errors import ConfigError, TuneforgeError
from tuneforge.fileio import atomic_write_text

RESOLVED_CONFIG = "config.yaml"
RUN_CONTENTS = ("adapter", "checkpoints", "tensorboard", "metrics.jsonl", "loss_curve.png", RESOLVED_CONFIG, "summary.json",
                "selection")
REPLACED_PREFIX = ".replaced-"
# Keys that change what a checkpoint's data position, optimizer state or adapter weights mean:
# resuming across a change to any of them would silently train a different run.
RESUME_SENSITIVE_KEYS = ("model", "adapter", "data", "quantization", "training.batch_size", "training.grad_accum",
                         "training.max_steps", "training.epochs", "training.seed", "update_rule")


def check_run_dir(config: TrainConfig, resume: bool, overwrite: bool = False, resume_anyway: bool = False) -> Path:
    """Cheap checks on ``output_dir``; changes nothing on disk."""
    run_dir = Path(config.output_dir).expanduser()
    previous = earlier_run_contents(run_dir)
    if previous and not resume and not overwrite:
        kept = sorted(p.name for p in run_dir.glob(f"{REPLACED_PREFIX}*"))
        aside = (f" An earlier run replaced with --overwrite is still kept in {', '.join(kept)}: the run that replaced "
                 "it stopped before its first checkpoint.") if kept else ""
        raise ConfigError(
            f"output_dir {run_dir} already holds a run ({', '.join(previous)}). Continue it with --resume, "
            f"pick another output_dir, or pass --overwrite to replace it.{aside}"
        )
    if resume and not resume_anyway:
        check_resume_config(run_dir, config)
    return run_dir


def earlier_run_contents(run_dir: Path) -> list[str]:
    return [name for name in RUN_CONTENTS if (run_dir / name).exists()]


def claim_run_dir(config: TrainConfig, run_dir: Path, resume: bool, overwrite: bool) -> Path | None:
    """Move an overwritten run aside (returns where) and record the resolved config."""
    aside = None
    previous = earlier_run_contents(run_dir)
    if previous and overwrite and not resume:
        aside = run_dir / f"{REPLACED_PREFIX}{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
        aside.mkdir()
        for name in previous:
            os.replace(run_dir / name, aside / name)  # a rename: nothing is deleted yet
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / RESOLVED_CONFIG, yaml.safe_dump(resolved_dict(config), sort_keys=False))
    return aside


def discard_replaced_runs(run_dir: Path) -> None:
    """Delete runs set aside by --overwrite: call once the new run has a checkpoint or has ended."""
    for aside in Path(run_dir).glob(f"{REPLACED_PREFIX}*"):
        shutil.rmtree(aside, ignore_errors=True)


def check_resume_config(run_dir: Path, config: TrainConfig) -> None:
    """Refuse to resume when a key the checkpoints depend on differs from the saved config."""
    saved_path = run_dir / RESOLVED_CONFIG
    if not saved_path.is_file():
        return  # nothing recorded (no run yet): there is nothing to compare
    try:
        saved = yaml.safe_load(saved_path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"--resume: {saved_path} cannot be read ({exc}); pass --resume-anyway to resume without "
                          "comparing configs") from None
    if not isinstance(saved, dict):
        raise ConfigError(f"--resume: {saved_path} is not a config mapping; pass --resume-anyway to resume without comparing configs")
    try:  # with every default filled in, a key added to the schema later is no difference
        saved = resolved_dict(parse_train_config(saved, source=str(saved_path)))
    except TuneforgeError:
        pass  # an older or foreign config: compare it as written
    current = resolved_dict(config)
    changes = [key for key in differing_keys(saved, current) if _resume_sensitive(key)]
    if changes:
        saved_flat, current_flat = _flatten(saved), _flatten(current)
        listed = "\n".join(f"  {key}: {saved_flat.get(key, '(not set)')!r} -> {current_flat.get(key, '(not set)')!r}"
                           for key in changes)
        raise ConfigError(
            f"--resume: the config differs from the one {run_dir} was started with in keys its checkpoints "
            f"depend on:\n{listed}\nResume with the saved config ({saved_path}), start a new run in another "
            "output_dir, or pass --resume-anyway to continue regardless."
        )


def resolved_dict(config: TrainConfig) -> dict[str, Any]:
    """The config as plain data, every key of the adapter method's own config included (the
    ``adapter`` field is declared as the base class, whose dump would drop ``r``, ``alpha``...)."""
    return config.model_dump(mode="json", serialize_as_any=True)


def differing_keys(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Dotted keys whose values differ (present in one and not the other included), sorted."""
    saved_flat, current_flat = _flatten(saved), _flatten(current)
    return sorted(key for key in saved_flat.keys() | current_flat.keys() if saved_flat.get(key, _MISSING) != current_flat.get(key, _MISSING))


_MISSING = object()


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _resume_sensitive(key: str) -> bool:
    return any(key == guarded or key.startswith(guarded + ".") for guarded in RESUME_SENSITIVE_KEYS)
