"""The run directory: refuse to clobber an earlier run unless asked, and record the resolved config."""

from __future__ import annotations

import shutil
from pathlib import Path

import yaml

from tuneforge.config.schema import TrainConfig
from tuneforge.errors import ConfigError
from tuneforge.fileio import atomic_write_text

RESOLVED_CONFIG = "config.yaml"
RUN_CONTENTS = ("adapter", "checkpoints", "tensorboard", "metrics.jsonl", "loss_curve.png", RESOLVED_CONFIG, "summary.json",
                "selection")


def prepare_run_dir(config: TrainConfig, resume: bool, overwrite: bool = False) -> Path:
    run_dir = Path(config.output_dir).expanduser()
    previous = [name for name in RUN_CONTENTS if (run_dir / name).exists()]
    if previous and not resume:
        if not overwrite:
            raise ConfigError(
                f"output_dir {run_dir} already holds a run ({', '.join(previous)}). Continue it with --resume, "
                "pick another output_dir, or pass --overwrite to replace it."
            )
        for name in previous:
            target = run_dir / name
            shutil.rmtree(target) if target.is_dir() else target.unlink()
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / RESOLVED_CONFIG, yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
    return run_dir
