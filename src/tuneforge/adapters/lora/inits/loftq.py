"""LoftQ (Li et al. 2023): choose the 4-bit base and the LoRA start together, so Q + s·B A ≈ W.

Paper: Li et al., "LoftQ: LoRA-Fine-Tuning-Aware Quantization for Large Language Models", ICLR 2024,
arXiv:2310.08659, Algorithm 1 (alternating quantization and low-rank SVD, written out below).

Alternate T times, starting from B A = 0:

    Q  = dequant(NF4(W - s·B A))
    B, A = rank-r SVD of (W - Q), split as U_r sqrt(S_r / s) and sqrt(S_r / s) V_rᵀ

The base weight then holds Q (dequantized: requantizing it with the same NF4 blocks reproduces the
same codes, so ``quant.quantize_model(..., double_quant=False)`` turns it into a real 4-bit layer),
and the adapter starts from the best rank-r correction of the quantization error instead of zero.
"""

from __future__ import annotations

import torch

from tuneforge.quant.blockwise import dequantize_4bit, quantize_4bit

BLOCKSIZE = 64


def nf4_roundtrip(weight: torch.Tensor) -> torch.Tensor:
    return dequantize_4bit(quantize_4bit(weight, "nf4", BLOCKSIZE), torch.float32)


def loftq_factors(weight: torch.Tensor, r: int, scaling: float,
                  iters: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(Q (out, in), A (r, in), B (out, r)) in float32 from ``weight`` (out, in)."""
    weight = weight.detach().float()
    low_rank = torch.zeros_like(weight)
    for _ in range(iters):
        quantized = nf4_roundtrip(weight - low_rank)
        left, values, right_t = torch.linalg.svd(weight - quantized, full_matrices=False)
        root = torch.sqrt(values[:r] / scaling)
        lora_A, lora_B = root[:, None] * right_t[:r], left[:, :r] * root[None, :]
        low_rank = scaling * lora_B @ lora_A
    return quantized, lora_A, lora_B
