"""The update-rule protocol the loop calls, and ``build_update_rule`` (``update_rule.method`` -> rule)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

Batch = dict[str, torch.Tensor]
# A micro-batch's share of the step loss: its summed token loss over the step's labelled tokens,
# so the shares of one step add up to the step's mean token loss.
LossFn = Callable[[Batch], torch.Tensor]


@dataclass
class WholeStepOutcome:
    loss: float  # the step's mean token loss (for MeZO: at the unperturbed weights, estimated as (L+ + L-)/2)
    grad_norm: float  # for MeZO: |projected gradient|, the size of the step taken along z
    applied: bool = True


class UpdateRule:
    """Plain backprop + ``optimizer.step()``; subclasses change what the loop cannot see.

    Subclasses that run forward, backward and the update themselves set ``takes_whole_step`` and
    implement ``whole_step``. Each rule's own state (beyond the optimizer's) goes in ``state_dict``.
    """

    takes_whole_step = False

    def __init__(self, optimizer: torch.optim.Optimizer):
        self.optimizer = optimizer

    def begin_step(self, model: nn.Module, step: int) -> None:
        """Called before step ``step`` (0-based) takes any gradient."""

    def whole_step(self, model: nn.Module, batches: list[Batch], loss_fn: LossFn,
                   max_grad_norm: float | None, step: int) -> WholeStepOutcome:
        raise NotImplementedError

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore ``state_dict()``'s output (called after the optimizer's state is loaded)."""


def build_update_rule(model: nn.Module, config, full_finetune: bool) -> UpdateRule:
    """The rule ``config.update_rule`` names, over the model's trainable parameters."""
    from tuneforge.train.optim import build_optimizer

    method = config.update_rule.method
    if method == "optimizer":
        return UpdateRule(build_optimizer(model, config.training, full_finetune=full_finetune))
    if method == "galore":
        from tuneforge.train.update_rules.galore import galore_rule

        return galore_rule(model, config)
    if method in ("apollo", "apollo-mini"):
        from tuneforge.train.update_rules.apollo import apollo_rule

        return apollo_rule(model, config)
    if method == "badam":
        from tuneforge.train.update_rules.badam import BlockAdam

        return BlockAdam(model, config)
    if method == "lisa":
        from tuneforge.train.update_rules.lisa import LayerwiseSampling

        return LayerwiseSampling(model, config)
    if method in ("lomo", "adalomo"):
        from tuneforge.train.update_rules.lomo import FusedBackwardUpdate

        return FusedBackwardUpdate(model, config)
    if method == "mezo":
        from tuneforge.train.update_rules.mezo import ZerothOrderSPSA

        return ZerothOrderSPSA(model, config)
    raise ValueError(f"unknown update_rule.method {method!r}")  # the schema's Literal makes this unreachable


def trainable_params(model: nn.Module) -> list[nn.Parameter]:
    """Each trainable parameter once (a tied embedding/head is one parameter), in model order."""
    seen, params = set(), []
    for param in model.parameters():
        if param.requires_grad and id(param) not in seen:
            seen.add(id(param))
            params.append(param)
    return params
