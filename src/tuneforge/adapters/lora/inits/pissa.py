"""PiSSA (Meng et al. 2024): train the principal singular components of W, freeze the rest.

Paper: Meng, Wang & Zhang, "PiSSA: Principal Singular Values and Singular Vectors Adaptation of Large
Language Models", NeurIPS 2024, arXiv:2404.02948; implements the initialisation of its method section
(written out below).

    W = U S Vᵀ,   B0 = U_r sqrt(S_r / s),   A0 = sqrt(S_r / s) V_rᵀ,   so s·B0 A0 = U_r S_r V_rᵀ

and the frozen residual W - s·B0 A0 holds the remaining components. ``niter`` switches the exact
SVD for torch's randomized one (Halko et al.), which costs O(out·in·r) instead of O(out·in·min); it
samples OVERSAMPLING extra directions and keeps the top r, as Halko et al. advise, since a sketch of
exactly r directions is poor when the spectrum decays slowly.
"""

from __future__ import annotations

import torch

# svd_lowrank draws a random start; a fixed seed makes the init a pure function of W, so reloading
# a saved adapter onto the same base rebuilds the same residual.
LOWRANK_SEED = 0
OVERSAMPLING = 8


def pissa_factors(weight: torch.Tensor, r: int, scaling: float,
                  niter: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(A (r, in), B (out, r)) from ``weight`` (out, in), in float32."""
    weight = weight.detach().float()
    if niter is None:
        left, values, right_t = torch.linalg.svd(weight, full_matrices=False)
        left, values, right_t = left[:, :r], values[:r], right_t[:r]
    else:
        with torch.random.fork_rng(devices=[weight.device] if weight.is_cuda else []):
            torch.manual_seed(LOWRANK_SEED)
            sketch = min(r + OVERSAMPLING, *weight.shape)
            left, values, right = torch.svd_lowrank(weight, q=sketch, niter=niter)
        left, values, right_t = left[:, :r], values[:r], right[:, :r].T
    root = torch.sqrt(values / scaling)  # (r,)
    return root[:, None] * right_t, left * root[None, :]
