"""How the loop runs on one process; the seam where torchrun data parallelism plugs in.

The loop asks its strategy to place batches, to reduce a metric across workers and whether this
worker writes files. A data-parallel strategy would wrap the model in DDP, give each rank every
``world_size``-th micro-batch and all-reduce the loss sums; the loop itself would not change.
"""

from __future__ import annotations

import os

import torch

from tuneforge.errors import ConfigError


class SingleProcess:
    world_size = 1
    rank = 0
    is_main = True

    def __init__(self, device: torch.device):
        self.device = device

    def my_batches(self, batches: list) -> list:
        return batches

    def to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    def reduce_sum(self, value: float) -> float:
        return value


def pick_strategy(device: torch.device) -> SingleProcess:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError(
            "tuneforge train was started by torchrun with WORLD_SIZE>1; data-parallel training is not "
            "available yet. Run it as a single process (python -m tuneforge / tuneforge train)."
        )
    return SingleProcess(device)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={name!r} was asked for, but no CUDA GPU is visible; use device=cpu or auto")
    return torch.device(name)
