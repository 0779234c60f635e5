"""CorDA (Yang et al. 2024): decompose W along the directions its inputs actually use.

Paper: Yang et al., "CorDA: Context-Oriented Decomposition Adaptation of Large Language Models for
Task-Aware Parameter-Efficient Fine-tuning", NeurIPS 2024, arXiv:2406.05223; implements the
covariance-oriented SVD of its method section (written out below) in both of its modes.

With C the (regularised) covariance of the layer's inputs over a few calibration batches::

    W C = U S Vᵀ,   W = U S Vᵀ C⁻¹   (exact, over all components)

instruction-previewed mode adapts the top-r components (those that carry the task's inputs),
knowledge-preserved mode the bottom-r ones (leaving the components the pretraining knowledge lives
in frozen):  B0 = U_k sqrt(S_k / s),  A0 = sqrt(S_k / s) V_kᵀ C⁻¹,  removed from W.
"""

from __future__ import annotations

import torch

# C gets DAMPING * mean(diag C) on its diagonal (the value CorDA's reference code starts from): a few
# batches rarely span every input direction, and C must be invertible to map the components back.
DAMPING = 0.01


def regularised_covariance(covariance: torch.Tensor) -> torch.Tensor:
    covariance = covariance.double()
    scale = covariance.diagonal().mean().clamp(min=1e-12)
    return covariance + DAMPING * scale * torch.eye(covariance.shape[0], dtype=covariance.dtype,
                                                    device=covariance.device)


def corda_factors(weight: torch.Tensor, covariance: torch.Tensor, r: int, scaling: float,
                  mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(A (r, in), B (out, r)) from ``weight`` (out, in) and the input covariance (in, in)."""
    regularised = regularised_covariance(covariance)
    left, values, right_t = torch.linalg.svd(weight.detach().double() @ regularised, full_matrices=False)
    chosen = slice(0, r) if mode == "instruction-previewed" else slice(values.shape[0] - r, values.shape[0])
    root = torch.sqrt(values[chosen] / scaling)
    # V_kᵀ C⁻¹ = (C⁻¹ V_k)ᵀ since C is symmetric; solve instead of forming the inverse.
    mapped = torch.linalg.solve(regularised, right_t[chosen].T).T  # (r, in)
    return (root[:, None] * mapped).float(), (left[:, chosen] * root[None, :]).float()
