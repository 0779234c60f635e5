"""MeZO: zeroth-order SGD from two forward passes (``update_rule.method: mezo``).

Paper: Malladi et al., "Fine-Tuning Language Models with Just Forward Passes", NeurIPS 2023,
arXiv:2305.17333, Algorithm 1 (MeZO) and §2 (n-SPSA). For each of n seeds s_i, with z_i ~ N(0, I)
drawn from s_i:

    θ ← θ + ε z_i;  ℓ+ = L(θ; B)        θ ← θ − 2ε z_i;  ℓ− = L(θ; B)        θ ← θ + ε z_i
    g_i = (ℓ+ − ℓ−) / (2ε)                                                 projected gradient (SPSA, eq. 1)
then  θ ← θ − (η / n) Σ_i g_i z_i                                         (z_i regenerated from s_i)

z is never stored: it is redrawn from its seed, one parameter at a time, in the same order, so the
memory is that of inference plus one parameter-sized temporary. Every perturbation is in place.

The seeds are a pure function of (training.seed, step, i), so a resumed run draws exactly the z an
uninterrupted one would: MeZO's seed stream needs no saved state. It trains whatever requires
grad — the full weights with ``adapter.method: full``, or an adapter's parameters (MeZO+LoRA and
MeZO+prefix in the paper, §3). Dropout would make ℓ+ and ℓ− differ for reasons other than z: the
schema refuses adapter.dropout, and this rule refuses a model with active dropout.
"""

from __future__ import annotations

import torch
from torch import nn

from tuneforge.errors import ConfigError
from tuneforge.train.update_rules.base import UpdateRule, WholeStepOutcome, trainable_params

SEED_STRIDE = 1_000_003  # a prime: (seed, step, i) -> distinct seeds for any realistic n_spsa and run length


class ZeroOrderState(torch.optim.Optimizer):
    """Holds the learning rate the scheduler sets; MeZO keeps no per-parameter state."""

    def __init__(self, params, lr: float, weight_decay: float):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay))

    def step(self, closure=None):
        raise RuntimeError("MeZO updates in whole_step; optimizer.step() is never called")


class ZerothOrderSPSA(UpdateRule):
    takes_whole_step = True

    def __init__(self, model: nn.Module, config):
        training, rule = config.training, config.update_rule
        _refuse_dropout(model)
        super().__init__(ZeroOrderState(trainable_params(model), lr=training.lr, weight_decay=training.weight_decay))
        self.eps = rule.eps
        self.n_spsa = rule.n_spsa
        self.base_seed = training.seed

    def seed_for(self, step: int, sample: int) -> int:
        return (self.base_seed * SEED_STRIDE + step) * SEED_STRIDE + sample

    @torch.no_grad()
    def whole_step(self, model, batches, loss_fn, max_grad_norm, step) -> WholeStepOutcome:
        params = self.optimizer.param_groups[0]["params"]
        projected, losses = [], []
        for sample in range(self.n_spsa):
            seed = self.seed_for(step, sample)
            perturb(params, seed, self.eps)
            loss_plus = _total_loss(batches, loss_fn)
            perturb(params, seed, -2 * self.eps)
            loss_minus = _total_loss(batches, loss_fn)
            perturb(params, seed, self.eps)  # back to θ
            projected.append((loss_plus - loss_minus) / (2 * self.eps))
            losses += [loss_plus, loss_minus]
        loss = sum(losses) / len(losses)
        size = sum(g * g for g in projected) ** 0.5 / len(projected)
        if not all(torch.isfinite(torch.tensor([*losses, *projected]))):
            return WholeStepOutcome(loss, size, applied=False)  # θ is restored; nothing moved
        group = self.optimizer.param_groups[0]
        if group["weight_decay"]:
            for param in params:
                param.mul_(1 - group["lr"] * group["weight_decay"])
        for sample, g in enumerate(projected):
            perturb(params, self.seed_for(step, sample), -group["lr"] * g / self.n_spsa)
        self.record_step(step, projected, group["lr"])
        return WholeStepOutcome(loss, size)

    def record_step(self, step: int, projected: list[float], lr: float) -> None:
        """Called once step ``step`` moved θ by −(lr / n_spsa)·Σ_i g_i z_i: FedKSeed clients record
        their (seed, g) pairs here (federated/fedkseed.py)."""


def perturb(params: list[nn.Parameter], seed: int, scale: float) -> None:
    """θ ← θ + scale·z, z ~ N(0, I) drawn from ``seed`` one parameter at a time, always in this order."""
    generator = None
    for param in params:
        if generator is None or generator.device != param.device:
            generator = torch.Generator(device=param.device).manual_seed(seed)
        z = torch.randn(param.shape, generator=generator, device=param.device, dtype=torch.float32)
        param.add_(z.to(param.dtype), alpha=scale)


def _total_loss(batches, loss_fn) -> float:
    return float(sum(loss_fn(batch).float() for batch in batches))


def _refuse_dropout(model: nn.Module) -> None:
    active = [name for name, module in model.named_modules() if isinstance(module, nn.Dropout) and module.p > 0]
    if active:
        raise ConfigError(
            f"update_rule.method=mezo compares two forward passes that must differ only by the perturbation, but "
            f"{len(active)} dropout module(s) of the model are active (e.g. {active[0]} p={model.get_submodule(active[0]).p}): "
            "use a model config with dropout 0 (attention_dropout, hidden_dropout, ...) or another update rule")
