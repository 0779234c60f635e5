"""GaLore: Adam on low-rank projections of the gradient (``update_rule.method: galore``).

Paper: Zhao et al., "GaLore: Memory-Efficient LLM Training by Gradient Low-Rank Projection", ICML 2024,
arXiv:2403.03507, Algorithm 2. For a weight W (m x n) with gradient G_t:

    every T steps (update_proj_gap):  U, S, V = SVD(G_t);  P = U[:, :r] if m <= n, else Q = V[:, :r]
    R_t = Pᵀ G_t  (r x n)      or      R_t = G_t Q  (m x r)                     project
    M_t = β1 M + (1-β1) R_t;   V_t = β2 V + (1-β2) R_t²                       Adam moments, r-sized
    N_t = M̂_t / (sqrt(V̂_t) + ε)
    W  ← W − η α (P N_t  or  N_t Qᵀ)                                           project back, scale α

so the optimizer state of W is 2·r·max(m, n) numbers, plus the projection, instead of 2·m·n. The
bias corrections are folded into the step size as in Kingma & Ba 2015 §2 ("the order of computation
could be improved"), which is what the authors' galore-torch does; tests compare a step with it.

Only the 2-D weights of decoder layers (attention and MLP matrices) are projected, as in the paper;
embeddings, norms and the head take ordinary Adam steps in the same optimizer.

``per_layer: true`` (the paper's §4.3 "per-layer weight updates") applies each weight's update from
a post-accumulate-grad hook during backward and frees its gradient at once, so only one full
gradient is alive at a time; the loop's ``optimizer.step()`` then finds nothing left to do. No global
gradient norm exists at that point, so the schema refuses ``training.max_grad_norm`` with it.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from tuneforge.adapters.targeting import DEFAULT_LAYER_PATTERNS, layer_index
from tuneforge.train.update_rules.base import UpdateRule, trainable_params
from tuneforge.train.update_rules.projected_adam import (
    PerParameterAdamW,
    advance_moments,
    decay_decoupled,
    refreshed_projection,
)


SLICE_ELEMENTS = 1 << 20  # an unprojected weight's Adam step is taken 4 MiB (float32) at a time


class GaLoreAdamW(PerParameterAdamW):
    """AdamW whose groups with ``rank`` keep their moments in the projected, r-dimensional space."""

    @torch.no_grad()
    def update_param(self, param: nn.Parameter, group: dict, index: int = 0) -> None:
        grad = param.grad
        state = self.state[param]
        projected = "rank" in group and grad.dim() == 2
        if projected:  # a new subspace every T steps; moments carry over (§4.1)
            projection = refreshed_projection(state, int(state.get("step", 0)), group["update_proj_gap"],
                                              lambda: _projection(grad, group["rank"]))
            grad = _project(grad, projection)
        step = advance_moments(state, grad, group["betas"])
        beta1, beta2 = group["betas"]
        step_size = group["lr"] * math.sqrt(1 - beta2**step) / (1 - beta1**step)
        decay_decoupled(param, group)
        if projected:
            direction = state["exp_avg"] / state["exp_avg_sq"].sqrt().add_(group["eps"])
            direction = _project_back(direction, state["projection"], param.shape).mul_(group["scale"])
            param.add_(direction.to(param.dtype), alpha=-step_size)
        else:
            _adam_step_by_slices(param, state, group["eps"], step_size)


def _adam_step_by_slices(param: nn.Parameter, state: dict, eps: float, step_size: float) -> None:
    """W -= step_size * M / (sqrt(V) + eps) one slice at a time: the same arithmetic, but the temporaries
    are one slice's size. Whole, they would be two copies of the largest unprojected weight (the
    embedding: 2 x 192 MiB on the 0.5B config), alive at the end of backward in per-layer mode."""
    contiguous = param.is_contiguous()
    weights = param.data if contiguous else param.data.contiguous()  # a strided weight: step a row-major copy
    slices = zip(weights.view(-1).split(SLICE_ELEMENTS), state["exp_avg"].reshape(-1).split(SLICE_ELEMENTS),
                 state["exp_avg_sq"].reshape(-1).split(SLICE_ELEMENTS))  # the moments are only read
    for weight, exp_avg, exp_avg_sq in slices:
        weight.add_((exp_avg / exp_avg_sq.sqrt().add_(eps)).to(weight.dtype), alpha=-step_size)
    if not contiguous:
        param.data.copy_(weights)


def _projection(grad: torch.Tensor, rank: int) -> torch.Tensor:
    """P = U[:, :r] (m x r) when m < n, else Qᵀ = V[:, :r]ᵀ (r x n): the smaller side is projected."""
    u, _, vh = torch.linalg.svd(grad.float(), full_matrices=False)
    rows, cols = grad.shape
    return (vh[:rank, :] if rows >= cols else u[:, :rank]).to(grad.dtype)


def _project(grad: torch.Tensor, projection: torch.Tensor) -> torch.Tensor:
    rows, cols = grad.shape
    return grad @ projection.T if rows >= cols else projection.T @ grad  # (m, r) or (r, n)


def _project_back(low_rank: torch.Tensor, projection: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    rows, cols = shape
    return low_rank @ projection if rows >= cols else projection @ low_rank  # (m, n)


def galore_param_groups(model: nn.Module, training, rule) -> list[dict]:
    """Decoder-layer matrices projected (rank, gap, scale); every other trainable tensor plain Adam."""
    names = {id(p): n for n, p in model.named_parameters()}
    projected, plain = [], []
    for param in trainable_params(model):
        inside_layer = layer_index(names[id(param)], DEFAULT_LAYER_PATTERNS) is not None
        (projected if inside_layer and param.dim() == 2 else plain).append(param)
    groups = [{"params": plain}] if plain else []
    if projected:
        groups.append({"params": projected, "rank": rule.rank, "update_proj_gap": rule.update_proj_gap,
                       "scale": rule.scale})
    return groups


class PerLayerGaLore(UpdateRule):
    """GaLore whose updates happen inside backward, one weight at a time."""

    def __init__(self, optimizer: GaLoreAdamW):
        super().__init__(optimizer)
        for index, group in enumerate(optimizer.param_groups):
            for param in group["params"]:
                param.register_post_accumulate_grad_hook(self._updater(index))

    def _updater(self, group_index: int):
        def update_and_free(param: nn.Parameter) -> None:
            # Looked up now, not captured: loading a checkpoint replaces the group dicts, and the
            # scheduler sets the learning rate on the current ones.
            self.optimizer.update_param(param, self.optimizer.param_groups[group_index])
            param.grad = None  # the next layer's gradient may use this memory
        return update_and_free


def galore_rule(model: nn.Module, config) -> UpdateRule:
    training, rule = config.training, config.update_rule
    optimizer = GaLoreAdamW(galore_param_groups(model, training, rule), lr=training.lr,
                            weight_decay=training.weight_decay)
    return PerLayerGaLore(optimizer) if rule.per_layer else UpdateRule(optimizer)
