"""EVA (Paischer et al. 2024, "One Initialization to Rule them All: Fine-tuning via Explained Variance
Adaptation", arXiv:2410.07170, Section 3): A from the directions that explain most of the layer's input variance.

Per layer, A0 = the top right singular vectors of the layer's centred calibration inputs X − 1μᵀ,
i.e. the top eigenvectors of the input covariance E[x xᵀ] − μ μᵀ (the paper's PCA; we accumulate the
moments batch by batch and take one exact eigendecomposition), B0 = 0, so W is not touched. Ranks are
then redistributed by explained variance ratio λ_i / Σ λ (the paper's rank allocation): every layer
offers its top round(rho · r_l) components (at most its input width), and the budget Σ_l r_l goes to
the largest ratios over all layers, so a layer can end with rank 0 and is then not adapted at all.
A layer whose rank changes gets alpha · r_new / r_l, which keeps its scale alpha / r_l.

This matches peft's EVA (``peft.tuners.lora.eva``) on the ranks, the scales and the components, with
two documented differences: peft runs an incremental, randomized PCA and stops once successive
batches agree to cosine similarity ``tau``, so its components approximate the exact ones computed
here (identical to within that tolerance when the calibration data are one batch, which peft repeats
until it converges); and peft computes one PCA for layers that receive the same input (q/k/v) and then
breaks ties between them so the first such layer gets the highest rank, where we break exact ties by
module order and then component index. peft also leaves out label-masked positions (labels == -100)
when the batch has labels; we use the attention mask only.
"""

from __future__ import annotations

import torch


def eva_components(covariance: torch.Tensor, max_rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(explained-variance ratios (k,), components (k, in)) of the top k = max_rank directions."""
    eigenvalues, vectors = torch.linalg.eigh(covariance.double())  # ascending
    eigenvalues = eigenvalues.flip(0).clamp(min=0)
    vectors = vectors.flip(1)
    ratios = eigenvalues / eigenvalues.sum().clamp(min=1e-30)
    return ratios[:max_rank].float(), vectors[:, :max_rank].T.float().contiguous()


def centred(gram: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """The covariance E[x xᵀ] − μ μᵀ from the second moment and the mean: (in, in)."""
    return gram - torch.outer(mean, mean)


def rank_cap(r: int, rho: float, in_features: int) -> int:
    """How many components a layer offers: round(rho · r), as peft, and no more than its input width."""
    return min(round(rho * r), in_features)


def allocate_ranks(ratios: dict[str, torch.Tensor], ranks: dict[str, int]) -> dict[str, int]:
    """New rank per layer: the budget sum(ranks) goes to the largest explained-variance ratios.

    ``ratios[name]`` lists that layer's candidates in descending order, already cut to its cap; a
    layer none of whose candidates makes the cut gets 0. Exact ties go to the earlier layer (in the
    order of ``ratios``), then the earlier component.
    """
    budget = sum(ranks.values())
    order = {name: position for position, name in enumerate(ratios)}
    candidates = sorted(
        ((float(value), name, index) for name, values in ratios.items() for index, value in enumerate(values)),
        key=lambda item: (-item[0], order[item[1]], item[2]),
    )
    allocated = dict.fromkeys(ratios, 0)
    for _, name, _ in candidates[:budget]:
        allocated[name] += 1
    return allocated


def scaled_alpha(alpha: float, new_rank: int, rank: int) -> float:
    """alpha · new_rank / rank: the redistributed layer keeps its scaling alpha / rank (peft's default)."""
    return alpha * new_rank / rank
