"""The AdamW bookkeeping GaLore and APOLLO share: one update per parameter, the moment EMAs, the
projection refreshed every T steps, and decoupled weight decay. Each optimizer keeps its own update
equation (GaLore's projected Adam step, APOLLO's channel scaling) in ``update_param``."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


class PerParameterAdamW(torch.optim.Optimizer):
    """An AdamW whose step is ``update_param`` on each parameter with a gradient, in order.

    ``index`` counts parameters from 1 across the groups in a fixed order, so a rule may seed
    per-weight randomness from it (APOLLO); per-layer updates inside backward call ``update_param``
    directly, one parameter at a time.
    """

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        index = 0
        for group in self.param_groups:
            for param in group["params"]:
                index += 1
                if param.grad is not None:
                    self.update_param(param, group, index)
        return loss

    def update_param(self, param: nn.Parameter, group: dict, index: int = 0) -> None:
        raise NotImplementedError


def refreshed_projection(state: dict, step: int, gap: int, make: Callable[[], torch.Tensor]) -> torch.Tensor:
    """A new subspace every ``gap`` steps (step counted from 0); the moments carry over unchanged."""
    if step % gap == 0:
        state["projection"] = make()
    return state["projection"]


def advance_moments(state: dict, value: torch.Tensor, betas: tuple[float, float]) -> int:
    """m <- b1 m + (1-b1) g, v <- b2 v + (1-b2) g^2 in ``value``'s shape; returns the step count t."""
    if "exp_avg" not in state:
        state["exp_avg"] = torch.zeros_like(value)
        state["exp_avg_sq"] = torch.zeros_like(value)
    beta1, beta2 = betas
    step = int(state.get("step", 0)) + 1
    state["step"] = torch.tensor(float(step))
    state["exp_avg"].mul_(beta1).add_(value, alpha=1 - beta1)
    state["exp_avg_sq"].mul_(beta2).addcmul_(value, value, value=1 - beta2)
    return step


def decay_decoupled(param: nn.Parameter, group: dict) -> None:
    """AdamW's weight decay, applied to the weight rather than the gradient (Loshchilov & Hutter 2019)."""
    if group["weight_decay"]:
        param.mul_(1 - group["lr"] * group["weight_decay"])
