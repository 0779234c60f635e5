"""int8 weight-only quantization with one absmax per output row (LLM.int8()'s weight format, without
the outlier decomposition): ``q = round(w / absmax * 127)``, ``w ≈ q * absmax / 127``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

_TINY = 1e-38  # an all-zero row keeps absmax 0 but divides by this, so its codes are 0


@dataclass
class Int8State:
    qweight: torch.Tensor  # int8 (out, in)
    absmax: torch.Tensor  # float32 (out,): max |w| of each row
    dtype: torch.dtype  # the original dtype

    @property
    def shape(self) -> torch.Size:
        return self.qweight.shape

    def tensors(self) -> list[torch.Tensor]:
        return [self.qweight, self.absmax]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())


def quantize_int8(weight: torch.Tensor) -> Int8State:
    """Per-row absmax int8 of a 2-D weight (rounding half to even, like ``torch.round``)."""
    if weight.dim() != 2 or not weight.is_floating_point():
        raise ValueError(f"quantize_int8 needs a 2-D floating-point weight, got {weight.dtype} {tuple(weight.shape)}")
    rows = weight.detach().float()
    absmax = rows.abs().amax(dim=1)  # (out,)
    scaled = rows / absmax.clamp(min=_TINY).unsqueeze(1) * 127
    qweight = scaled.round().clamp(-127, 127).to(torch.int8)
    return Int8State(qweight=qweight, absmax=absmax, dtype=weight.dtype)


def dequantize_int8(state: Int8State, dtype: torch.dtype | None = None) -> torch.Tensor:
    return dequantize_int8_rows(state, 0, state.shape[0], dtype)


def dequantize_int8_rows(state: Int8State, start: int, stop: int, dtype: torch.dtype | None = None) -> torch.Tensor:
    rows = state.qweight[start:stop].float() * (state.absmax[start:stop] / 127).unsqueeze(1)
    return rows.to(dtype or state.dtype)
