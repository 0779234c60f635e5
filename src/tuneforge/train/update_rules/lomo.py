"""LOMO and AdaLomo: the update fused into backward (``update_rule.method: lomo`` / ``adalomo``).

Papers:
- LOMO: Lv et al., "Full Parameter Fine-tuning for Large Language Models with Limited Resources",
  2023, arXiv:2306.09782, §3.2 and Algorithm 1: SGD, θ ← θ − η·g, applied to each parameter as soon as
  its gradient is computed, after which the gradient is freed; no optimizer state and at most one
  parameter's gradient alive. §3.3: clipping by the global gradient norm needs that norm before any
  update, so a first backward pass only accumulates ‖g‖² and a second one applies
  θ ← θ − η·g·min(1, c/‖g‖).
- AdaLomo: Lv et al., "AdaLomo: Low-memory Optimization with Adaptive Learning Rate", 2023,
  arXiv:2310.10195, Algorithm 1: the second moment factored as in Adafactor (Shazeer & Stern 2018),
      r_t = β_t r + (1−β_t)·mean_cols(g² + ε1),   c_t = β_t c + (1−β_t)·mean_rows(g² + ε1),
      v_t = (r_t / mean(r_t)) c_tᵀ,   u_t = g / sqrt(v_t)      (a vector keeps v_t itself)
      û_t = u_t / max(1, RMS(u_t) / d)                              grouped update normalization
      θ ← θ − η·max(ε2, RMS(θ))·û_t,      β_t = 1 − t^(−0.8)
  with ε1 = 1e-30, ε2 = 1e-3, d = 1.

PyTorch's post-accumulate-grad hooks run once a parameter's gradient is complete (a tied
embedding/head included), which is exactly when the papers apply the update. The hooks act only
inside ``whole_step``; the ``optimizer`` the loop sees holds the learning rate (set by the
scheduler) and AdaLomo's factored moments, so the checkpoint saves them like any optimizer state.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from tuneforge.train.update_rules.base import UpdateRule, WholeStepOutcome, trainable_params

ADALOMO_EPS = (1e-30, 1e-3)  # ε1 (inside the squared gradient), ε2 (floor of RMS(θ)); AdaLomo Algorithm 1
ADALOMO_DECAY = -0.8  # β_t = 1 − t^(−0.8)
ADALOMO_CLIP = 1.0  # d of the grouped update normalization


class FusedStateHolder(torch.optim.Optimizer):
    """Holds the learning rate and per-parameter state; the updates happen in backward hooks."""

    def __init__(self, params, lr: float, weight_decay: float):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay))

    def step(self, closure=None):
        raise RuntimeError("LOMO/AdaLomo update inside backward; optimizer.step() is never called")


class FusedBackwardUpdate(UpdateRule):
    takes_whole_step = True

    def __init__(self, model: nn.Module, config):
        training = config.training
        super().__init__(FusedStateHolder(trainable_params(model), lr=training.lr, weight_decay=training.weight_decay))
        self.adaptive = config.update_rule.method == "adalomo"
        self.two_pass = config.update_rule.clip_two_pass
        self.mode = "off"  # "norm": accumulate ‖g‖²; "update": apply; "off": outside a step
        self.norm_sq = 0.0
        self.clip_coef = 1.0
        self.step_number = 0
        group = self.optimizer.param_groups[0]
        for param in group["params"]:
            param.register_post_accumulate_grad_hook(self._on_gradient)

    def whole_step(self, model, batches, loss_fn, max_grad_norm, step) -> WholeStepOutcome:
        self.step_number = step + 1
        batch = batches[0]  # the schema refuses grad_accum > 1: a fused update cannot wait for more
        clip = max_grad_norm is not None
        self.clip_coef = 1.0
        grad_norm = float("nan")
        loss = None
        if clip and self.two_pass:
            loss, grad_norm = self._backward(model, batch, loss_fn, "norm")
            if not (math.isfinite(loss) and math.isfinite(grad_norm)):
                return WholeStepOutcome(loss, grad_norm, applied=False)  # nothing was applied yet
            self.clip_coef = min(1.0, max_grad_norm / (grad_norm + 1e-6))  # as torch's clip_grad_norm_
        second_loss, second_norm = self._backward(model, batch, loss_fn, "update")
        if loss is None:
            loss, grad_norm = second_loss, second_norm
        return WholeStepOutcome(loss, grad_norm)

    def _backward(self, model, batch, loss_fn, mode: str) -> tuple[float, float]:
        self.mode, self.norm_sq = mode, 0.0
        try:
            loss = loss_fn(batch)
            loss.backward()
        finally:
            self.mode = "off"
        return float(loss.detach()), math.sqrt(self.norm_sq)

    @torch.no_grad()
    def _on_gradient(self, param: nn.Parameter) -> None:
        if self.mode == "off":
            return
        grad = param.grad.float()
        param.grad = None  # freed at once: the point of a fused update
        self.norm_sq += float(grad.pow(2).sum())
        if self.mode == "norm":
            return
        group = self.optimizer.param_groups[0]
        grad.mul_(self.clip_coef)
        if self.adaptive:
            update = self._adalomo_direction(param, grad)
            lr = group["lr"] * max(ADALOMO_EPS[1], _rms(param.float()))
        else:
            update, lr = grad, group["lr"]
        if group["weight_decay"]:
            param.mul_(1 - lr * group["weight_decay"])
        param.add_(update.to(param.dtype), alpha=-lr)

    def _adalomo_direction(self, param: nn.Parameter, grad: torch.Tensor) -> torch.Tensor:
        state = self.optimizer.state[param]
        beta = 1.0 - self.step_number ** ADALOMO_DECAY
        squared = grad.pow(2).add_(ADALOMO_EPS[0])
        if grad.dim() >= 2:
            if "row" not in state:
                state["row"] = torch.zeros(grad.shape[:-1])  # (m,)
                state["col"] = torch.zeros(grad.shape[:-2] + grad.shape[-1:])  # (n,)
            state["row"].mul_(beta).add_(squared.mean(dim=-1), alpha=1 - beta)
            state["col"].mul_(beta).add_(squared.mean(dim=-2), alpha=1 - beta)
            row_factor = (state["row"] / state["row"].mean(dim=-1, keepdim=True)).rsqrt().unsqueeze(-1)  # (m, 1)
            update = grad * row_factor * state["col"].unsqueeze(-2).rsqrt()  # (m, n)
        else:
            if "second" not in state:
                state["second"] = torch.zeros_like(grad)
            state["second"].mul_(beta).add_(squared, alpha=1 - beta)
            update = grad * state["second"].rsqrt()
        return update / max(1.0, _rms(update) / ADALOMO_CLIP)


def _rms(tensor: torch.Tensor) -> float:
    return float(tensor.norm()) / math.sqrt(tensor.numel())
