"""OLoRA (Büyükakyüz 2024): start from the orthonormal basis of W's column space.

Paper: Büyükakyüz, "OLoRA: Orthonormal Low-Rank Adaptation of Large Language Models", 2024,
arXiv:2406.01775; implements the QR initialisation of its method section (written out below).

    W = Q R (thin QR),   B0 = Q[:, :r],   A0 = R[:r, :]

so B starts orthonormal; s·B0 A0 moves out of W into the residual (PEFT's convention: A, B are not
rescaled by s).
"""

from __future__ import annotations

import torch


def olora_factors(weight: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A (r, in), B (out, r)) from ``weight`` (out, in), in float32."""
    q, upper = torch.linalg.qr(weight.detach().float())
    return upper[:r].contiguous(), q[:, :r].contiguous()
