"""FedKSeed: federated full-parameter tuning by zeroth-order steps on K shared seeds (``federated.method: fedkseed``).

    adapter: {method: full}
    update_rule: {method: mezo, eps: 1.0e-3}
    training: {weight_decay: 0.0}
    federated: {method: fedkseed, seeds: 4096}

Paper: Qin et al., "Federated Full-Parameter Tuning of Billion-Sized Language Models with Communication
Cost under 18 Kilobytes", ICML 2024, arXiv:2312.06353, §3 and Algorithm 1. The server and every client
share K candidate seeds s_1..s_K. A client's local step is MeZO's SPSA step (``train/update_rules/mezo.py``)
with its seed drawn uniformly from the K candidates:

    j ~ U{1..K};  g = (L(θ + ε z_j) − L(θ − ε z_j)) / (2ε);  θ ← θ − η g z_j        z_j ~ N(0, I) from s_j

so a round of local training is fully described by its pairs (j, g) (and each step's η): that is all a
client uploads. Since every step is linear in z_j, the weighted average of the clients' models is the
global model minus Σ_k (n_k / n) Σ_t η_t g_t z_{j_t}, and the whole history collapses to one coefficient
per candidate seed:

    θ_r = θ_0 − Σ_j c_j z_j,        c_j ← c_j + Σ_k (n_k / n) Σ_{t: j_t = j} η_t g_t / n_spsa

The server sends c (K floats) down; a client rebuilds θ_r by replaying it on θ_0 (the pretrained
model every party loads) and trains from there. FedKSeed-Pro's probability-differentiated seed
sampling (§4) is not built: seeds are drawn uniformly.

Replaying draws z with torch's generator on the parameters' device, so every party must train and
evaluate on the same device type (all CPU or all CUDA). Weight decay would make the steps non-linear
in z (θ is shrunk before each step), so it is refused (``config.py``).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from tuneforge.train.update_rules.base import trainable_params
from tuneforge.train.update_rules.mezo import ZerothOrderSPSA, perturb

COEFFICIENTS = "seed-coefficients"  # the one array sent down: c, one float per candidate seed
UPLOAD_KEYS = ("seed-index", "projected-grad", "lr")  # what a client sends: one entry per SPSA sample


def candidate_seeds(seed: int, count: int) -> list[int]:
    """The K seeds shared by the server and every client: a pure function of ``federated.seed``."""
    return [int(s) for s in np.random.default_rng([seed, count]).integers(0, 2**62, size=count)]


class CandidateSeedSPSA(ZerothOrderSPSA):
    """MeZO's update rule with each perturbation's seed drawn from the K candidates, every applied
    (seed index, projected gradient, learning rate) recorded for the upload."""

    def __init__(self, model: nn.Module, config, seeds: list[int], rng: np.random.Generator):
        super().__init__(model, config)
        self.seeds = seeds
        self.rng = rng
        self.drawn: dict[tuple[int, int], int] = {}  # (step, sample) -> candidate index
        self.indices: list[int] = []
        self.projected: list[float] = []
        self.rates: list[float] = []

    def seed_for(self, step: int, sample: int) -> int:
        # asked twice per sample (perturb, then update): the draw is made once
        if (step, sample) not in self.drawn:
            self.drawn[(step, sample)] = int(self.rng.integers(len(self.seeds)))
        return self.seeds[self.drawn[(step, sample)]]

    def record_step(self, step: int, projected: list[float], lr: float) -> None:
        for sample, g in enumerate(projected):
            self.indices.append(self.drawn[(step, sample)])
            self.projected.append(float(g))
            self.rates.append(float(lr))

    def upload(self) -> dict[str, np.ndarray]:
        return {"seed-index": np.asarray(self.indices, np.int32),
                "projected-grad": np.asarray(self.projected, np.float32),
                "lr": np.asarray(self.rates, np.float32)}


def upload_problem(upload: dict[str, np.ndarray], seed_count: int) -> str | None:
    """Why ``upload`` is not a list of (seed index, projected gradient, lr) entries, or None."""
    if set(upload) != set(UPLOAD_KEYS):
        return f"FedKSeed upload must hold exactly {list(UPLOAD_KEYS)}, found {sorted(upload)}"
    indices, grads, rates = (upload[key] for key in UPLOAD_KEYS)
    if any(array.ndim != 1 for array in (indices, grads, rates)) or not len(indices) == len(grads) == len(rates):
        return (f"FedKSeed upload arrays must be 1-D and equally long, found shapes {indices.shape}, "
                f"{grads.shape}, {rates.shape}")
    if indices.dtype.kind not in "iu" or grads.dtype.kind != "f" or rates.dtype.kind != "f":
        return f"seed-index must be integers and the scalars floats, found {indices.dtype}, {grads.dtype}, {rates.dtype}"
    if len(indices) and (indices.min() < 0 or indices.max() >= seed_count):
        return f"seed-index outside 0..{seed_count - 1} (found {indices.min()}..{indices.max()})"
    if not (np.isfinite(grads).all() and np.isfinite(rates).all()) or (rates < 0).any():
        return "projected-grad or lr holds NaN, infinite or (lr) negative values"
    return None


def accumulate(coefficients: np.ndarray, uploads: list[dict[str, np.ndarray]], weights: list[float],
               n_spsa: int) -> np.ndarray:
    """c + Σ_k (w_k / Σw) Σ_t lr_t g_t / n_spsa at each upload's seed indices (float64 sums, float32 result)."""
    total = float(sum(weights))
    updated = np.asarray(coefficients, np.float64).copy()
    for upload, weight in zip(uploads, weights):
        steps = upload["lr"].astype(np.float64) * upload["projected-grad"].astype(np.float64) / n_spsa
        np.add.at(updated, upload["seed-index"].astype(np.int64), steps * (weight / total))
    return updated.astype(np.float32)


@torch.no_grad()
def replay(params: list[nn.Parameter], seeds: list[int], coefficients: np.ndarray) -> None:
    """θ ← θ − Σ_j c_j z_j over the nonzero c_j, in index order (the same order everywhere)."""
    for index in np.flatnonzero(coefficients):
        perturb(params, seeds[int(index)], -float(coefficients[index]))


class GlobalModel:
    """The server's θ_0 and its replays: ``materialise(c)`` puts θ_0 − Σ_j c_j z_j in the model."""

    def __init__(self, model: nn.Module, seeds: list[int]):
        self.params = trainable_params(model)
        self.initial = [param.detach().clone() for param in self.params]
        self.seeds = seeds

    @torch.no_grad()
    def materialise(self, coefficients: np.ndarray) -> None:
        for param, start in zip(self.params, self.initial):
            param.copy_(start)
        replay(self.params, self.seeds, coefficients)
