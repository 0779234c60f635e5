"""AdamW over the trainable adapter parameters (or, in a full finetune, the model's trainable weights),
and warmup + cosine/linear/constant schedules."""

from __future__ import annotations

import math

import torch
from torch import nn

from tuneforge.adapters import loraplus_param_groups
from tuneforge.adapters.optim import scale_optimizer_steps
from tuneforge.config.schema import TrainingConfig
from tuneforge.errors import ConfigError


def build_optimizer(model: nn.Module, training: TrainingConfig, *, full_finetune: bool = False) -> torch.optim.Optimizer:
    if full_finetune:
        groups = full_param_groups(model, training)
    else:
        groups = loraplus_param_groups(model, training.lr, weight_decay=training.weight_decay,
                                       loraplus_ratio=training.loraplus_ratio)
    if not groups:
        raise ConfigError("the model has no trainable parameters: check adapter.target_modules")
    for group in groups:
        group.pop("name", None)
    if training.optimizer == "adamw8bit":
        from tuneforge.quant.optim8bit import AdamW8bit

        optimizer = AdamW8bit(groups, lr=training.lr, betas=(0.9, 0.999), weight_decay=training.weight_decay)
    else:
        fused = all(p.is_cuda for g in groups for p in g["params"])
        optimizer = torch.optim.AdamW(groups, lr=training.lr, betas=(0.9, 0.999), fused=fused or None)
    scale_optimizer_steps(optimizer, model)  # per-row learning rates of methods such as ALLoRA
    return optimizer


def full_param_groups(model: nn.Module, training: TrainingConfig) -> list[dict]:
    """One group of the model's trainable weights (each once: a tied embedding/head is one tensor)."""
    from tuneforge.train.update_rules.base import trainable_params

    params = trainable_params(model)
    return [{"params": params, "lr": training.lr, "weight_decay": training.weight_decay}] if params else []


def warmup_steps(training: TrainingConfig, total_steps: int) -> int:
    if training.warmup_steps is not None:
        return min(training.warmup_steps, total_steps)
    return int(training.warmup_ratio * total_steps)


def lr_factor(step: int, total_steps: int, warmup: int, kind: str) -> float:
    """Multiplier of the peak learning rate at optimizer step ``step`` (0-based)."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if kind == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total_steps - warmup)
    progress = min(max(progress, 0.0), 1.0)
    if kind == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, training: TrainingConfig, total_steps: int):
    warmup = warmup_steps(training, total_steps)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, total_steps, warmup, training.scheduler))
