"""Merging task tensors: pure-torch functions, one per method family.

A *task tensor* τ_i is what adapter i adds to one weight (a full ΔW, or one LoRA factor). Each
function combines n task tensors of one shape with per-adapter weights w_i (a negative weight
subtracts a skill) into one tensor of that shape::

    task_arithmetic   Σ_i w_i τ_i                                   (Ilharco et al. 2023)
    magnitude_prune   Σ_i w_i trim(τ_i)                             trim keeps the top-k |values|
    ties              disjoint_mean(w_i trim(τ_i) where sign agrees)  (Yadav et al. 2023)
    dare              Σ_i w_i drop(τ_i), or its TIES form            (Yu et al. 2024)

The steps (trim, random drop, sign election, disjoint mean) are public too, so a new method is a
few lines. Semantics follow PEFT's ``add_weighted_adapter`` so merged adapters agree with it:
k = ⌊density·n⌋ values survive trimming, and the sign is elected on the *unweighted* trimmed
tensors before the weights are applied.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch

from tuneforge.errors import ConfigError

SignMethod = Literal["total", "frequency"]
SIGN_METHODS = ("total", "frequency")


def check_density(density: float | None, method: str = "this method") -> float:
    """Density is the kept fraction: 1 keeps everything, values near 0 keep almost nothing."""
    if density is None:
        raise ConfigError(f"{method} needs density=<fraction of values to keep>, a number in (0, 1], e.g. density=0.5")
    if not 0.0 < float(density) <= 1.0:
        raise ConfigError(f"density={density!r} is outside (0, 1]: it is the fraction of values each adapter keeps")
    return float(density)


def check_sign_method(majority_sign_method: str) -> SignMethod:
    if majority_sign_method not in SIGN_METHODS:
        raise ConfigError(
            f"majority_sign_method={majority_sign_method!r} is not one of {SIGN_METHODS}: 'total' elects the sign of "
            "the summed values, 'frequency' the sign most adapters have"
        )
    return majority_sign_method


def _stack(tensors: Sequence[torch.Tensor],
           weights: Sequence[float] | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, *shape) tensors and (n, 1, ..., 1) weights, ready to broadcast."""
    if len(tensors) == 0:
        raise ConfigError("nothing to merge: give at least one tensor")
    weights = torch.as_tensor(weights, dtype=tensors[0].dtype, device=tensors[0].device).reshape(-1)
    if weights.numel() != len(tensors):
        raise ConfigError(f"got {weights.numel()} weights for {len(tensors)} tensors; give one weight per tensor")
    shapes = {tuple(t.shape) for t in tensors}
    if len(shapes) > 1:
        raise ConfigError(f"task tensors must all have one shape to be merged, got {sorted(shapes)}")
    stacked = torch.stack(list(tensors))  # (n, *shape)
    return stacked, weights.reshape((-1,) + (1,) * (stacked.dim() - 1))


def trim_by_magnitude(tensor: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the k = ⌊density·numel⌋ entries of largest |value|, zero the rest (TIES step 1, "trim")."""
    density = check_density(density)
    if density >= 1.0:
        return tensor
    k = int(density * tensor.numel())
    flat = tensor.reshape(-1)
    keep = torch.zeros_like(flat, dtype=torch.bool)
    keep[flat.abs().topk(k).indices] = True
    return (flat * keep).reshape(tensor.shape)


def random_drop(tensor: torch.Tensor, density: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """DARE's Drop And REscale: keep each entry with probability ``density``, divide survivors by it.

    E[random_drop(τ)] = τ, since each entry is kept with probability d and scaled by 1/d
    (Yu et al. 2024, "Language Models are Super Mario", eq. 2; their drop rate p = 1 - d).
    """
    density = check_density(density)
    if density >= 1.0:
        return tensor
    keep = torch.bernoulli(torch.full_like(tensor, density), generator=generator)
    return tensor * keep / density


def elect_sign(stacked: torch.Tensor, majority_sign_method: SignMethod = "total") -> torch.Tensor:
    """Which entries agree with the elected sign (TIES step 2, "elect"): bool mask of ``stacked``'s shape.

    The elected sign is sgn(Σ_i τ_i) ("total": the sign holding more mass) or sgn(Σ_i sgn τ_i)
    ("frequency": the sign more tensors have); ties go to +. Zero entries never agree.
    """
    signs = stacked.sign()  # (n, *shape)
    votes = stacked.sum(dim=0) if check_sign_method(majority_sign_method) == "total" else signs.sum(dim=0)
    elected = torch.where(votes >= 0, 1.0, -1.0).to(signs.dtype)  # (*shape)
    return signs == elected


def disjoint_mean(weighted: torch.Tensor, agree: torch.Tensor) -> torch.Tensor:
    """Mean over the tensors whose entry agrees with the elected sign (TIES step 3, "disjoint merge")."""
    count = agree.sum(dim=0).clamp(min=1)
    return (weighted * agree).sum(dim=0) / count


def task_arithmetic(tensors: Sequence[torch.Tensor], weights: Sequence[float] | torch.Tensor) -> torch.Tensor:
    """Σ_i w_i τ_i (Ilharco et al. 2023, "Editing Models with Task Arithmetic")."""
    stacked, w = _stack(tensors, weights)
    return (stacked * w).sum(dim=0)


def magnitude_prune(tensors: Sequence[torch.Tensor], weights: Sequence[float] | torch.Tensor,
                    density: float) -> torch.Tensor:
    """Σ_i w_i trim(τ_i, density): task arithmetic on magnitude-pruned task tensors."""
    density = check_density(density, "magnitude_prune")
    return task_arithmetic([trim_by_magnitude(t, density) for t in tensors], weights)


def ties(tensors: Sequence[torch.Tensor], weights: Sequence[float] | torch.Tensor, density: float,
         majority_sign_method: SignMethod = "total") -> torch.Tensor:
    """TIES-Merging (Yadav et al. 2023, "TIES-Merging: Resolving Interference When Merging Models", §3).

    1. trim: τ̂_i = trim(τ_i, density), keeping the top-⌊density·n⌋ magnitudes of each tensor;
    2. elect: γ = sgn(Σ_i τ̂_i) (or the majority of sgn τ̂_i with "frequency");
    3. disjoint merge: out = Σ_{i: sgn τ̂_i = γ} w_i τ̂_i / |{i: sgn τ̂_i = γ}|  (0 where none agree).
    """
    density = check_density(density, "ties")
    stacked, w = _stack([trim_by_magnitude(t, density) for t in tensors], weights)
    return disjoint_mean(stacked * w, elect_sign(stacked, majority_sign_method))


def dare(tensors: Sequence[torch.Tensor], weights: Sequence[float] | torch.Tensor, density: float, *,
         majority_sign_method: SignMethod | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """DARE (Yu et al. 2024, "Language Models are Super Mario", §3): drop at random, rescale, then merge.

    τ̃_i = m_i ⊙ τ_i / density with m_i ~ Bernoulli(density), one mask per tensor, drawn in order
    from ``generator``. Then ``majority_sign_method=None`` gives Σ_i w_i τ̃_i ("dare_linear"), and
    "total"/"frequency" give TIES' elect + disjoint merge on the τ̃_i ("dare_ties").
    """
    density = check_density(density, "dare")
    dropped = [random_drop(t, density, generator) for t in tensors]
    if majority_sign_method is None:
        return task_arithmetic(dropped, weights)
    stacked, w = _stack(dropped, weights)
    return disjoint_mean(stacked * w, elect_sign(stacked, majority_sign_method))
