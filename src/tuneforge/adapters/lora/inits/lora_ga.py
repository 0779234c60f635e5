"""LoRA-GA (Wang et al. 2024): align the first LoRA step with the first full-finetuning step.

Paper: Wang, Yu & Li, "LoRA-GA: Low-Rank Adaptation with Gradient Approximation", NeurIPS 2024,
arXiv:2407.05000; implements the gradient-aligned initialisation and stable scale of its method section
(written out below).

With G = U S Vᵀ the gradient of the loss with respect to W (averaged over calibration batches),
one step of LoRA changes W by roughly -η s² (B0 B0ᵀ G + G A0ᵀ A0). Choosing

    A0 = c · V[:, :r]ᵀ,   B0 = c · U[:, r:2r],   c = d_out^(1/4) / sqrt(gamma)   (the paper's stable scale)

makes that step the best rank-2r approximation of the full gradient step. The product s·B0 A0 is
removed from W so the model is unchanged at init.
"""

from __future__ import annotations

import torch


def lora_ga_factors(gradient: torch.Tensor, r: int, gamma: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(A (r, in), B (out, r)) from the gradient (out, in), in float32."""
    left, _, right_t = torch.linalg.svd(gradient.detach().float(), full_matrices=False)
    scale = gradient.shape[0] ** 0.25 / gamma ** 0.5
    return scale * right_t[:r], scale * left[:, r:2 * r]
