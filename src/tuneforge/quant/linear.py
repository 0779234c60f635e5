"""``QuantLinear``: a frozen Linear whose weight is stored quantized (4-bit NF4/FP4 or int8).

``forward`` never holds the full-precision weight: it dequantizes ``chunk_rows`` output rows at a
time, multiplies, and drops the chunk::

    out[..., rows] = x @ dequantize(W[rows]).T      for each chunk of rows

Backward does the same to get ∂L/∂x = Σ_chunks ∂L/∂out[..., rows] @ W[rows]; it saves neither x
nor W (the weight is frozen, so no ∂L/∂W is needed). The quantized tensors are buffers, never
parameters, so no optimizer can touch them. 4-bit chunks are decoded by bitsandbytes' kernels where
they run and by pure torch otherwise, to the same values (bnb_backend.py, TUNEFORGE_QUANT_BACKEND).

Adapters (LoRA, DoRA) see the same surface as on ``nn.Linear``: ``in_features``, ``out_features``,
``bias`` and ``weight``, which here returns a freshly dequantized (out, in) tensor — for reading
(DoRA's row norms, exports); writing into it changes nothing.
"""

from __future__ import annotations

import torch
from torch import nn

from tuneforge.errors import ConfigError
from tuneforge.quant import bnb_backend
from tuneforge.quant.blockwise import (
    BLOCKSIZES,
    QUANT_TYPES,
    DoubleQuant,
    QuantState,
    dequantize_rows,
    quantize_4bit,
)
from tuneforge.quant.int8 import Int8State, dequantize_int8_rows, quantize_int8

BITS = (4, 8)
COMPUTE_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
# Default chunk: ~1M weight values (4 MB in float32) per dequantization. Enough rows to keep the
# matmul efficient (~500 of a 2048-wide layer); 4M made the decode temporaries ~40 MB of a QLoRA
# step's peak on a 1.1B model.
CHUNK_ELEMENTS = 1 << 20


def check_quant_settings(bits: int, quant_type: str, blocksize: int, compute_dtype: torch.dtype) -> None:
    """ConfigError naming the offending value and the allowed ones; ``quant_type``/``blocksize`` apply to bits=4."""
    if bits not in BITS:
        raise ConfigError(f"bits={bits!r} is not supported; choose 4 (blockwise NF4/FP4) or 8 (int8, one scale per row)")
    if bits == 4 and quant_type not in QUANT_TYPES:
        raise ConfigError(f"quant_type={quant_type!r} is not supported for bits=4; choose one of {', '.join(map(repr, QUANT_TYPES))}")
    if bits == 4 and blocksize not in BLOCKSIZES:
        raise ConfigError(f"blocksize={blocksize!r} is not supported; choose one of {', '.join(map(str, BLOCKSIZES))}")
    if compute_dtype not in COMPUTE_DTYPES:
        allowed = ", ".join(str(d) for d in COMPUTE_DTYPES)
        raise ConfigError(f"compute_dtype={compute_dtype!r} is not supported; choose one of {allowed}")


class _ChunkedDequantMatmul(torch.autograd.Function):
    """x @ W.T with W dequantized chunk by chunk, in forward and again in backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: QuantLinear) -> torch.Tensor:
        ctx.layer = layer
        rows = x.reshape(-1, layer.in_features)  # (N, in)
        out = rows.new_empty(rows.shape[0], layer.out_features)  # (N, out)
        for start, stop, weight in layer.weight_chunks(rows.dtype):  # weight: (chunk, in)
            out[:, start:stop] = rows @ weight.T
        return out.reshape(*x.shape[:-1], layer.out_features)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        layer = ctx.layer
        grad_rows = grad_out.reshape(-1, layer.out_features)  # (N, out)
        grad_x = grad_rows.new_zeros(grad_rows.shape[0], layer.in_features)  # (N, in)
        for start, stop, weight in layer.weight_chunks(grad_rows.dtype):
            grad_x.addmm_(grad_rows[:, start:stop], weight)
        return grad_x.reshape(*grad_out.shape[:-1], layer.in_features), None


class QuantLinear(nn.Module):
    """y = x Wᵀ + b with W stored quantized; build one with ``QuantLinear.from_linear``."""

    def __init__(self, state: QuantState | Int8State, bias: torch.Tensor | None,
                 compute_dtype: torch.dtype = torch.bfloat16, chunk_rows: int | None = None):
        super().__init__()
        if len(state.shape) != 2:
            raise ValueError(f"QuantLinear needs a 2-D (out, in) weight, got shape {tuple(state.shape)}")
        self.out_features, self.in_features = state.shape
        self.weight_dtype = state.dtype
        self.compute_dtype = compute_dtype
        self.chunk_rows = chunk_rows or max(1, CHUNK_ELEMENTS // self.in_features)
        if isinstance(state, Int8State):
            self.bits, self.quant_type, self.blocksize = 8, "int8", None
            self.register_buffer("qweight", state.qweight)
            self.register_buffer("absmax", state.absmax)
            self.register_buffer("absmax2", None)
            self.register_buffer("absmax_offset", None)
        else:
            self.bits, self.quant_type, self.blocksize = 4, state.quant_type, state.blocksize
            second = state.double_quant
            self.register_buffer("qweight", state.packed)
            self.register_buffer("absmax", state.absmax)
            self.register_buffer("absmax2", None if second is None else second.absmax)
            self.register_buffer("absmax_offset", None if second is None else second.offset)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int = 4, quant_type: str = "nf4", blocksize: int = 64,
                    double_quant: bool = True, compute_dtype: torch.dtype = torch.bfloat16,
                    chunk_rows: int | None = None) -> QuantLinear:
        check_quant_settings(bits, quant_type, blocksize, compute_dtype)
        weight = linear.weight.detach()
        if bits == 8:
            state = quantize_int8(weight)
        else:
            state = quantize_4bit(weight, quant_type=quant_type, blocksize=blocksize, double_quant=double_quant)
        return cls(state, linear.bias, compute_dtype=compute_dtype, chunk_rows=chunk_rows)

    @property
    def double_quant(self) -> bool:
        return self.absmax2 is not None

    def quant_state(self) -> QuantState | Int8State:
        """The stored weight as a state object (views of this module's buffers, wherever they live)."""
        if self.bits == 8:
            return Int8State(qweight=self.qweight, absmax=self.absmax, dtype=self.weight_dtype)
        second = DoubleQuant(absmax=self.absmax2, offset=self.absmax_offset) if self.double_quant else None
        return QuantState(packed=self.qweight, absmax=self.absmax, shape=torch.Size((self.out_features, self.in_features)),
                          dtype=self.weight_dtype, blocksize=self.blocksize, quant_type=self.quant_type,
                          double_quant=second)

    def dequantize_rows(self, start: int, stop: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Rows [start, stop) of W, (stop - start, in), in ``dtype`` (default: the original dtype)."""
        state, dtype = self.quant_state(), dtype or self.weight_dtype
        if self.bits == 8:
            return dequantize_int8_rows(state, start, stop, dtype)
        if bnb_backend.use_bitsandbytes(state, dtype):  # same values, faster where its kernel runs
            return bnb_backend.dequantize_rows(state, start, stop, dtype)
        return dequantize_rows(state, start, stop, dtype)

    def weight_chunks(self, dtype: torch.dtype):
        """(start, stop, W[start:stop] in ``dtype``) for consecutive chunks of ``chunk_rows`` rows."""
        for start in range(0, self.out_features, self.chunk_rows):
            stop = min(start + self.chunk_rows, self.out_features)
            yield start, stop, self.dequantize_rows(start, stop, dtype)

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The full W, (out, in): for merging exports and DoRA's row norms, not for forward."""
        return self.dequantize_rows(0, self.out_features, dtype)

    @property
    def weight(self) -> torch.Tensor:
        """W dequantized to its original dtype, as adapters read ``nn.Linear.weight``; a fresh tensor."""
        return self.dequantized_weight()

    def weight_nbytes(self) -> int:
        """Bytes stored for the weight (codes, scales, double-quant state); the bias is not counted."""
        return self.quant_state().nbytes()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = _ChunkedDequantMatmul.apply(x.to(self.compute_dtype), self)
        if self.bias is not None:
            out = out + self.bias.to(self.compute_dtype)
        return out.to(x.dtype)

    def extra_repr(self) -> str:
        kind = f"{self.quant_type}, blocksize={self.blocksize}, double_quant={self.double_quant}" if self.bits == 4 else "int8"
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"{kind}, compute_dtype={self.compute_dtype}")
