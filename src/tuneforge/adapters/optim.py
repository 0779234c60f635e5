"""What adapters contribute to the optimizer: parameter groups, and per-parameter step multipliers.

- LoRA+ (Hayou et al. 2024) trains B with a learning rate ``ratio`` times larger than A's (the paper
  suggests ~16); groups are built from each adapter's ``parameter_roles()``, never from parameter names.
- Methods whose update rule is a per-row (or per-element) learning rate, such as ALLoRA, implement
  ``StepScaledAdapter``. A scale put on the *gradient* would not survive Adam, which divides each
  coordinate by its own gradient history (exactly so at the first step), so the multiplier is put on
  the *step* instead: ``scale_optimizer_steps`` hooks the optimizer so that each step becomes
  ``p ← p_before + m ⊙ (p_after − p_before)``, the optimizer's step (Adam direction and decoupled
  weight decay alike) taken with learning rate ``lr · m``. Any torch optimizer works unchanged.
"""

from __future__ import annotations

import torch
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


class StepScaledAdapter:
    """Mixin for a layer adapter whose update rule multiplies some parameters' learning rate."""

    def step_multipliers(self) -> list[tuple[nn.Parameter, torch.Tensor]]:
        """(parameter, multiplier broadcastable to it), read from the weights before the step."""
        raise NotImplementedError


def step_scaled_adapters(model: nn.Module) -> list[StepScaledAdapter]:
    return [adapter for _, layer in wrapped_layers(model) for adapter in layer.adapters.values()
            if isinstance(adapter, StepScaledAdapter)]


def scale_optimizer_steps(optimizer: torch.optim.Optimizer, model: nn.Module) -> None:
    """Make ``optimizer.step()`` honour the step multipliers of ``model``'s step-scaled adapters.

    The hooks live on the optimizer object, not in its state, so a resumed run gets them again by
    calling this after building its optimizer (the multipliers are recomputed from the weights).
    """
    adapters = step_scaled_adapters(model)
    if not adapters:
        return
    pending: list[tuple[nn.Parameter, torch.Tensor, torch.Tensor]] = []

    def remember_weights(opt, args, kwargs):
        pending.clear()
        with torch.no_grad():
            for adapter in adapters:
                for param, multiplier in adapter.step_multipliers():
                    if param.requires_grad and param.grad is not None:
                        pending.append((param, param.detach().clone(), multiplier.to(param.dtype)))

    def rescale_steps(opt, args, kwargs):
        with torch.no_grad():
            for param, before, multiplier in pending:
                param.copy_(torch.lerp(before, param, multiplier))  # before + m·(after − before)
        pending.clear()

    optimizer.register_step_pre_hook(remember_weights)
    optimizer.register_step_post_hook(rescale_steps)
