"""Optimizer parameter groups from adapter structure, including LoRA+ (Hayou et al. 2024).

LoRA+ trains B with a learning rate ``ratio`` times larger than A's (the paper suggests ~16);
groups are built from each adapter's ``parameter_roles()``, never from parameter names.
"""

from __future__ import annotations

from torch import nn

from tuneforge.adapters.model import saved_module_copies, wrapped_layers
from tuneforge.adapters.model_level import model_adapters

LORAPLUS_ROLES = ("lora_B", "lora_embedding_B")


def loraplus_param_groups(model: nn.Module, lr: float, *, weight_decay: float = 0.0,
                          loraplus_ratio: float | None = None) -> list[dict]:
    """Param groups over the trainable adapter parameters; B gets ``lr * loraplus_ratio`` when set."""
    base, boosted = [], []
    for _, layer in wrapped_layers(model):
        for adapter in layer.adapters.values():
            for role, params in adapter.parameter_roles().items():
                target = boosted if loraplus_ratio and role in LORAPLUS_ROLES else base
                target.extend(p for p in params if p.requires_grad)
    for _, copies in saved_module_copies(model):
        for replica in copies.modules_to_save.values():
            base.extend(p for p in replica.parameters() if p.requires_grad)
    for _, model_adapter in model_adapters(model):
        for params in model_adapter.parameter_roles().values():
            base.extend(p for p in params if p.requires_grad)
    groups = [{"params": base, "lr": lr, "weight_decay": weight_decay, "name": "adapter"}]
    if boosted:
        groups.append({"params": boosted, "lr": lr * loraplus_ratio, "weight_decay": weight_decay, "name": "lora_B"})
    return [g for g in groups if g["params"]]
