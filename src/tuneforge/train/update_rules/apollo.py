"""APOLLO and APOLLO-Mini: SGD-like memory, Adam-like steps (``update_rule.method: apollo`` / ``apollo-mini``).

Paper: Zhu et al., "APOLLO: SGD-like Memory, AdamW-level Performance", MLSys 2025, arXiv:2412.05270,
Algorithm 1. For a decoder-layer weight W (m x n, m ≤ n; the transposed case mirrors it) with gradient G_t:

    every T steps:  P ~ N(0, 1/r), r x m, from a seed                       random projection, no SVD
    R_t = P G_t  (r x n);   Adam moments on R_t;   R̃_t = M̂_t / (sqrt(V̂_t) + ε)
    s_j = ‖R̃_t[:, j]‖ / ‖R_t[:, j]‖   per channel j (APOLLO)
    s   = ‖R̃_t‖ / ‖R_t‖              for the whole tensor, with r = 1 (APOLLO-Mini)
    G̃_t = α · G_t · diag(s)                                                 the *full* gradient, rescaled
    if ‖G̃_t‖ > γ ‖G̃_{t-1}‖:  G̃_t ← G̃_t · γ ‖G̃_{t-1}‖ / ‖G̃_t‖,   γ = 1.01   norm-growth limiter
    W ← W − η G̃_t

The moments are r x n, so APOLLO-Mini's state is two vectors per weight: SGD-like memory. The
projection is kept in the optimizer state (r x m numbers), so a resumed run continues with it.
Defaults: α = 1 for APOLLO and √128 for APOLLO-Mini unless ``update_rule.scale`` is set (the authors'
scripts pass apollo_scale 1 and 128, and their apollo-torch multiplies the update by its square root).
apollo-torch 1.0.3 is not the test oracle: it also multiplies the rescaled *raw* gradient by Adam's
bias-correction factor and seeds its projections differently; the test writes Algorithm 1 out instead.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from tuneforge.train.update_rules.base import UpdateRule
from tuneforge.train.update_rules.galore import galore_param_groups
from tuneforge.train.update_rules.projected_adam import (
    PerParameterAdamW,
    advance_moments,
    decay_decoupled,
    refreshed_projection,
)

GROWTH_LIMIT = 1.01  # γ of the norm-growth limiter
MINI_SCALE = math.sqrt(128)
NORM_FLOOR = 1e-8  # keeps a zero gradient channel from dividing by zero


class ApolloAdamW(PerParameterAdamW):
    """AdamW for groups without ``rank``; APOLLO's scaled-gradient step for groups with it."""

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
                 seed: int = 0):
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        self.seed = seed

    @torch.no_grad()
    def update_param(self, param: nn.Parameter, group: dict, index: int = 0) -> None:
        grad = param.grad.float()
        state = self.state[param]
        lowrank = "rank" in group and grad.dim() == 2
        left = lowrank and grad.shape[0] <= grad.shape[1]  # project the smaller side
        if lowrank:
            step = int(state.get("step", 0))
            projection = refreshed_projection(state, step, group["update_proj_gap"],
                                              lambda: self._projection(grad, group["rank"], left, index, step))
            moment_input = projection @ grad if left else grad @ projection.T  # (r, n) / (m, r)
        else:
            moment_input = grad
        step = advance_moments(state, moment_input, group["betas"])
        beta1, beta2 = group["betas"]
        m_hat = state["exp_avg"] / (1 - beta1**step)
        v_hat = state["exp_avg_sq"] / (1 - beta2**step)
        adam = m_hat / (v_hat.sqrt() + group["eps"])
        if lowrank:
            update = group["scale"] * grad * self._scaling(adam, moment_input, left, group["tensor_wise"])
            update = self._limit_growth(update, state)
        else:
            update = adam
        decay_decoupled(param, group)
        param.add_(update.to(param.dtype), alpha=-group["lr"])

    def _projection(self, grad, rank: int, left: bool, index: int, step: int) -> torch.Tensor:
        """P ~ N(0, 1/r), (r, m) for a left projection or (r, n) for a right one; seeded per weight and period."""
        generator = torch.Generator(device=grad.device).manual_seed((self.seed * 1_000_003 + index) * 1_000_003 + step)
        side = grad.shape[0] if left else grad.shape[1]
        return torch.randn(rank, side, generator=generator, device=grad.device) / math.sqrt(rank)

    @staticmethod
    def _scaling(adam: torch.Tensor, projected: torch.Tensor, left: bool, tensor_wise: bool) -> torch.Tensor:
        if tensor_wise:
            return adam.norm() / (projected.norm() + NORM_FLOOR)
        dim = 0 if left else 1  # the channel is a column of G for a left projection, a row for a right one
        scale = adam.norm(dim=dim) / (projected.norm(dim=dim) + NORM_FLOOR)
        return scale if left else scale.unsqueeze(1)  # (n,) broadcasts over rows; (m, 1) over columns

    @staticmethod
    def _limit_growth(update: torch.Tensor, state: dict) -> torch.Tensor:
        norm = update.norm()
        if "last_norm" in state and norm > GROWTH_LIMIT * state["last_norm"]:
            update = update * (GROWTH_LIMIT * state["last_norm"] / norm)
            norm = GROWTH_LIMIT * state["last_norm"]
        state["last_norm"] = norm.detach().clone()
        return update


def apollo_rule(model: nn.Module, config) -> UpdateRule:
    training, rule = config.training, config.update_rule
    mini = rule.method == "apollo-mini"
    scale = rule.scale if "scale" in rule.model_fields_set else (MINI_SCALE if mini else 1.0)
    groups = galore_param_groups(model, training, rule)
    for group in groups:
        if "rank" in group:
            group.update(rank=1 if mini else rule.rank, scale=scale, tensor_wise=mini)
    return UpdateRule(ApolloAdamW(groups, lr=training.lr, weight_decay=training.weight_decay, seed=training.seed))
