"""The value tables ("codebooks") of the 4-bit and 8-bit formats, as bitsandbytes defines them.

A code is an index into its table; dequantizing is ``table[code] * absmax``. The tables are data
from the QLoRA paper and bitsandbytes' format, so files quantized here and there mean the same.
"""

from __future__ import annotations

import torch

# NF4 (Dettmers et al. 2023, "QLoRA", §3 and Appendix E): quantiles of N(0, 1) chosen so that each
# of the 16 bins holds equal probability mass, with an exact zero; 8 positive and 7 negative
# quantiles taken between probabilities 1 - 0.9677083 and 0.9677083, then normalised by the largest
# so the table spans [-1, 1]. Listed in code order (ascending), as float32.
NF4_VALUES = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)
NF4_QUANTILE_OFFSET = 0.9677083

# FP4 as bitsandbytes encodes it: bit 3 is the sign, bits 2..0 a 2-bit exponent and 1-bit mantissa
# (exponent bias 2; 0b000 = 0, 0b001 = subnormal 0.0625). Listed by bit pattern, not by value, then
# divided by the largest magnitude (12) in float32. Pattern 0b1000 is -0.0 (sign bit, zero
# magnitude), as bitsandbytes' CUDA and AVX2 CPU kernels decode it; its Python table and its AVX-512 CPU
# kernel give +0.0, equal as numbers.
FP4_BIT_PATTERN_VALUES = (0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0,
                          -0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0)

CODEBOOK_NAMES = ("nf4", "fp4")


def codebook(quant_type: str) -> torch.Tensor:
    """The 16 float32 values of ``quant_type`` ('nf4' or 'fp4'), indexed by 4-bit code."""
    if quant_type == "nf4":
        return torch.tensor(NF4_VALUES, dtype=torch.float32)
    if quant_type == "fp4":
        values = torch.tensor(FP4_BIT_PATTERN_VALUES, dtype=torch.float32)
        return values / values.abs().max()
    raise ValueError(f"unknown 4-bit codebook {quant_type!r}; choose one of {CODEBOOK_NAMES}")


def normal_float_quantiles(offset: float = NF4_QUANTILE_OFFSET) -> torch.Tensor:
    """NF4 recomputed from the normal quantile function in float64: documents where the table comes from."""
    positive = torch.special.ndtri(torch.linspace(offset, 0.5, 9, dtype=torch.float64)[:-1])  # 8 values
    negative = -torch.special.ndtri(torch.linspace(offset, 0.5, 8, dtype=torch.float64)[:-1])  # 7 values
    values = torch.cat([positive, negative, torch.zeros(1, dtype=torch.float64)]).sort().values
    return values / values.max()


def unsigned_dynamic_map() -> torch.Tensor:
    """The unsigned 8-bit dynamic map (8-bit optimizers, Dettmers et al. 2022): no sign bit, so the
    freed bit doubles every decade's resolution: decade ``i`` (0..6) holds 2^(i+1) values; plus 0 and 1.

    Used for Adam's second moment, which is never negative.
    """
    values = [0.0, 1.0]
    for decade in range(7):
        edges = torch.linspace(0.1, 1, 2 ** (decade + 1) + 1, dtype=torch.float32)
        values += ((10.0 ** (decade - 6)) * ((edges[:-1] + edges[1:]) / 2.0)).tolist()
    return torch.tensor(sorted(values), dtype=torch.float32)


def dynamic_map() -> torch.Tensor:
    """bitsandbytes' signed 8-bit "dynamic" map (Dettmers 2015, arXiv:1511.04561), ascending, float32.

    Decade ``i`` (0..6) spans magnitudes 10^(i-6) * [0.1, 1] with 2^i evenly spaced values (the
    midpoints of 2^i + 1 edges), mirrored for negatives; plus 0 and 1: 2 * 127 + 2 = 256 values.
    Small magnitudes get few values, large ones many: relative precision stays roughly constant.
    """
    values = [0.0, 1.0]
    for decade in range(7):
        edges = torch.linspace(0.1, 1, 2**decade + 1, dtype=torch.float32)
        magnitudes = (10.0 ** (decade - 6)) * ((edges[:-1] + edges[1:]) / 2.0)
        values += magnitudes.tolist() + (-magnitudes).tolist()
    return torch.tensor(sorted(values), dtype=torch.float32)
