"""EVA (Paischer et al. 2024): A from the directions that explain most of the layer's input variance.

Per layer, the right singular vectors of the stacked calibration inputs X (tokens, in) are the
eigenvectors of Xᵀ X, which we accumulate batch by batch; A0 = the top ones, B0 = 0, so W is not
touched. Ranks are then redistributed by explained variance (λ_i / Σ λ): all layers' components
compete for the total budget Σ r_l, each layer taking at most rho·r_l and at least one.
"""

from __future__ import annotations

import math

import torch


def eva_components(gram: torch.Tensor, max_rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(explained-variance ratios (k,), components (k, in)) of the top k = max_rank directions."""
    eigenvalues, vectors = torch.linalg.eigh(gram.double())  # ascending
    eigenvalues = eigenvalues.flip(0).clamp(min=0)
    vectors = vectors.flip(1)
    ratios = eigenvalues / eigenvalues.sum().clamp(min=1e-30)
    return ratios[:max_rank].float(), vectors[:, :max_rank].T.float().contiguous()


def rank_cap(r: int, rho: float, in_features: int, out_features: int) -> int:
    return max(1, min(math.floor(rho * r), in_features, out_features))


def allocate_ranks(ratios: dict[str, torch.Tensor], ranks: dict[str, int]) -> dict[str, int]:
    """New rank per layer: the budget sum(ranks) goes to the largest explained-variance ratios.

    ``ratios[name]`` lists that layer's candidates in descending order, already cut to its cap.
    """
    budget = sum(ranks.values())
    allocated = {name: 1 for name in ratios}  # every layer keeps its leading direction
    candidates = sorted(
        ((float(value), name, index) for name, values in ratios.items() for index, value in enumerate(values) if index),
        key=lambda item: (-item[0], item[1], item[2]),
    )
    for _, name, _ in candidates[: max(0, budget - len(allocated))]:
        allocated[name] += 1
    return allocated
