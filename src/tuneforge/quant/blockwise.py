"""Blockwise 4-bit (NF4 / FP4) quantization with double quantization, in pure PyTorch.

The format is bitsandbytes' ``quantize_4bit`` (QLoRA, Dettmers et al. 2023, §3), bit for bit::

    W (any shape) --flatten--> blocks of `blocksize` values (the last one may be partial)
    absmax[b] = max |w| over block b                                     (float32)
    code      = index of the nearest codebook value to w / absmax[b]     (a value exactly halfway
                between two codebook values takes the lower one)
    packed    = two codes per byte: element 2k in the high nibble, 2k+1 in the low nibble

Double quantization (QLoRA §3) stores the per-block absmax in 8 bits instead of 32::

    offset = mean(absmax);  absmax - offset --blocks of 256--> dynamic 8-bit codes + one float32
    absmax per 256 blocks

so a weight costs 4 + 8/64 + 32/(64*256) bits per value at blocksize 64 (plus one float32 offset per
tensor), instead of 4 + 32/64 without it. Our 8-bit absmax codes are the nearest code; bitsandbytes'
CPU kernel searches approximately and takes a neighbour on up to ~1% of blocks (values within ~2e-5 of
a midpoint). Either decodes here, to ``codebook[code] * absmax`` bit for bit.

A size that is not a multiple of the blocksize is padded with zeros up to whole blocks; padding
never changes an absmax, and only ceil(numel / 2) bytes of codes are kept.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch

from tuneforge.quant.codebooks import codebook, dynamic_map

BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
QUANT_TYPES = ("nf4", "fp4")
ABSMAX_BLOCKSIZE = 256  # double quantization's block, fixed by the format
QUANTIZE_CHUNK = 1 << 20  # weight values quantized at a time (float32 temporaries of a few MB)
_TINY = 1e-38  # an all-zero block divides by this instead of 0 (its codes all become the zero code)


@dataclass
class DoubleQuant:
    """The second level of double quantization: how to turn the uint8 absmax codes back into float32."""

    absmax: torch.Tensor  # float32 (ceil(blocks / 256),): absmax of each 256-block of (absmax - offset)
    offset: torch.Tensor  # float32 (): mean of the first-level absmax, subtracted before quantizing


@dataclass
class QuantState:
    """A 4-bit blockwise-quantized tensor: everything needed to rebuild it."""

    packed: torch.Tensor  # uint8 (ceil(numel / 2),)
    absmax: torch.Tensor  # float32 (blocks,), or uint8 (blocks,) codes when double_quant is set
    shape: torch.Size
    dtype: torch.dtype  # the original dtype; dequantize returns it unless told otherwise
    blocksize: int
    quant_type: str
    double_quant: DoubleQuant | None = None

    @property
    def numel(self) -> int:
        return self.shape.numel()

    @property
    def blocks(self) -> int:
        return -(-self.numel // self.blocksize)

    def tensors(self) -> list[torch.Tensor]:
        stored = [self.packed, self.absmax]
        if self.double_quant is not None:
            stored += [self.double_quant.absmax, self.double_quant.offset]
        return stored

    def nbytes(self) -> int:
        """Bytes this state stores (the shared codebooks are constants and not counted)."""
        return sum(t.numel() * t.element_size() for t in self.tensors())


def check_blocksize(blocksize: int) -> None:
    if blocksize not in BLOCKSIZES:
        raise ValueError(f"blocksize={blocksize!r} is not supported; choose one of {', '.join(map(str, BLOCKSIZES))}")


def check_quant_type(quant_type: str) -> None:
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"quant_type={quant_type!r} is not supported; choose one of {', '.join(QUANT_TYPES)}")


@lru_cache(maxsize=None)
def _table(name: str) -> torch.Tensor:
    """Cached float32 tables on the CPU; callers move them and never write into them."""
    return dynamic_map() if name == "dynamic" else codebook(name)


def _on(name: str, device: torch.device) -> torch.Tensor:
    return _table(name).to(device)


@lru_cache(maxsize=None)
def _rounding_table(quant_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(midpoints between the sorted codebook values, code of each sorted position).

    NF4 is listed in ascending order already; FP4 is listed by bit pattern, so sorted positions map
    back to codes. The two FP4 zeros (patterns 0 and 8) keep their pattern order (stable sort).
    """
    values = _table(quant_type)
    order = torch.argsort(values, stable=True)
    ascending = values[order]
    midpoints = (ascending[:-1] + ascending[1:]) / 2  # float32, as the reference computes them
    return midpoints, order.to(torch.uint8)


def _blocks_of(flat: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, int]:
    """float32 (blocks, blocksize) view of ``flat`` padded with zeros; also the length of the last block."""
    numel = flat.numel()
    blocks = -(-numel // blocksize)
    padded = torch.zeros(blocks * blocksize, dtype=torch.float32, device=flat.device)
    padded[:numel] = flat
    last = numel - (blocks - 1) * blocksize
    return padded.view(blocks, blocksize), last


def quantize_4bit(weight: torch.Tensor, quant_type: str = "nf4", blocksize: int = 64,
                  double_quant: bool = False) -> QuantState:
    """Quantize ``weight`` (float32/bfloat16/float16, any shape) to packed 4-bit codes.

    ``double_quant`` also quantizes the per-block absmax (8 bits, blocks of 256, minus its mean).
    Blocks are independent, so the work goes ``QUANTIZE_CHUNK`` values at a time: the float32
    temporaries then stay a few MB instead of ~16 bytes per weight value, which would be the peak
    of loading a model quantized.
    """
    check_quant_type(quant_type)
    check_blocksize(blocksize)
    if not weight.is_floating_point():
        raise ValueError(f"quantize_4bit needs a floating-point tensor, got {weight.dtype}")
    if weight.numel() == 0:
        raise ValueError("quantize_4bit got an empty tensor")
    flat = weight.detach().reshape(-1)
    chunk = max(blocksize, QUANTIZE_CHUNK // blocksize * blocksize)  # whole blocks, so whole bytes
    parts = [_quantize_blocks(flat[start:start + chunk], quant_type, blocksize) for start in range(0, flat.numel(), chunk)]
    packed = torch.cat([codes for codes, _ in parts]) if len(parts) > 1 else parts[0][0]
    absmax = torch.cat([scales for _, scales in parts]) if len(parts) > 1 else parts[0][1]
    state = QuantState(packed=packed, absmax=absmax, shape=weight.shape, dtype=weight.dtype,
                       blocksize=blocksize, quant_type=quant_type)
    if double_quant:
        offset = absmax.mean()
        state.absmax, second = quantize_dynamic_8bit(absmax - offset, ABSMAX_BLOCKSIZE)
        state.double_quant = DoubleQuant(absmax=second, offset=offset)
    return state


def _quantize_blocks(values: torch.Tensor, quant_type: str, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(packed codes, float32 absmax per block) of consecutive blocks; only the last may run short."""
    flat = values.float()
    blocks, last = _blocks_of(flat, blocksize)  # (B, blocksize)
    absmax = blocks.abs().amax(dim=1)  # (B,)
    safe = absmax.clamp(min=_TINY)
    # bitsandbytes scales whole blocks by the reciprocal of absmax but a partial last block by
    # division (and stores that block's absmax clamped); the two can differ in the last bit, which
    # decides values sitting on a rounding midpoint, so we do the same.
    scaled = blocks * (1.0 / safe).unsqueeze(1)
    if last < blocksize:
        scaled[-1] = blocks[-1] / safe[-1]
        absmax[-1] = safe[-1]
    scaled = scaled.clamp(-1, 1).reshape(-1)[: flat.numel() + flat.numel() % 2]  # whole bytes only
    midpoints, code_of_position = _rounding_table(quant_type)
    position = torch.bucketize(scaled, midpoints.to(flat.device), out_int32=True)  # (numel,)
    codes = code_of_position.to(flat.device)[position]
    return (codes[0::2] << 4) | codes[1::2], absmax  # (ceil(numel / 2),), (B,)


def block_absmax(state: QuantState, first: int = 0, stop: int | None = None) -> torch.Tensor:
    """float32 absmax of blocks [first, stop), undoing double quantization if it was used."""
    stop = state.blocks if stop is None else stop
    if state.double_quant is None:
        return state.absmax[first:stop]
    groups = torch.arange(first, stop, device=state.absmax.device) // ABSMAX_BLOCKSIZE
    values = _on("dynamic", state.absmax.device)[state.absmax[first:stop].long()]
    return values * state.double_quant.absmax[groups] + state.double_quant.offset


def _unpack_blocks(state: QuantState, first: int, stop: int) -> torch.Tensor:
    """float32 values of blocks [first, stop) in the flattened tensor (the last may run short)."""
    start = first * state.blocksize
    end = min(stop * state.blocksize, state.numel)
    packed = state.packed[start // 2: (end + 1) // 2]  # blocksize is even: start is byte-aligned
    # One 8-byte gather per packed byte from a 256-entry table holding its (high, low) float32 pair,
    # viewed as float64 so index_select moves both values at once (~5x faster than indexing codes).
    pairs = _byte_pairs(state.quant_type, packed.device).index_select(0, packed.long())
    values = pairs.view(torch.float32)  # (2 * bytes,)
    absmax = block_absmax(state, first, stop)
    full = (stop - first) * state.blocksize
    values = torch.nn.functional.pad(values, (0, full - values.numel())) if values.numel() < full else values[:full]
    return (values.view(stop - first, state.blocksize) * absmax.unsqueeze(1)).view(-1)[: end - start]


@lru_cache(maxsize=None)
def _byte_pairs_cpu(quant_type: str) -> torch.Tensor:
    table = _table(quant_type)
    byte = torch.arange(256)
    pairs = torch.stack([table[byte >> 4], table[byte & 0x0F]], dim=1).contiguous()  # (256, 2) float32
    return pairs.view(torch.float64).reshape(256)  # each entry: both values' bits, not a number


def _byte_pairs(quant_type: str, device: torch.device) -> torch.Tensor:
    return _byte_pairs_cpu(quant_type).to(device)


def dequantize_4bit(state: QuantState, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The full tensor in ``dtype`` (default: the dtype it was quantized from)."""
    values = _unpack_blocks(state, 0, state.blocks)
    return values.to(dtype or state.dtype).reshape(state.shape)


def row_blocks(state: QuantState, start: int, stop: int) -> tuple[int, int, int]:
    """Rows [start, stop) of a 2-D weight lie in blocks [first, stop_block), from ``offset`` in block ``first``."""
    first_element, end_element = start * state.shape[-1], stop * state.shape[-1]
    first_block = first_element // state.blocksize
    stop_block = -(-end_element // state.blocksize)
    return first_block, stop_block, first_element - first_block * state.blocksize


def dequantize_rows(state: QuantState, start: int, stop: int, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Rows [start, stop) of a 2-D quantized weight, touching only the blocks that hold them."""
    columns = state.shape[-1]
    first_block, stop_block, offset = row_blocks(state, start, stop)
    values = _unpack_blocks(state, first_block, stop_block)
    rows = values[offset: offset + (stop - start) * columns]
    return rows.to(dtype or state.dtype).reshape(stop - start, columns)


def quantize_dynamic_8bit(values: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Blockwise 8-bit quantization with the dynamic map: (uint8 codes like ``values``, float32 absmax).

    Nearest map value to ``v / absmax``; on an exact tie the lower one, comparing float32 distances
    as bitsandbytes' CPU kernel does (used for the absmax of double quantization).
    """
    flat = values.reshape(-1).float()
    blocks, _ = _blocks_of(flat, blocksize)  # (B, blocksize)
    absmax = blocks.abs().amax(dim=1)
    normed = (blocks / absmax.clamp(min=_TINY).unsqueeze(1)).reshape(-1)[: flat.numel()]
    table = _on("dynamic", flat.device)
    below = (torch.searchsorted(table, normed, right=True) - 1).clamp(0, table.numel() - 1)
    above = (below + 1).clamp(max=table.numel() - 1)
    closer_above = (normed - table[above]).abs() < (normed - table[below]).abs()
    codes = torch.where(closer_above, above, below).to(torch.uint8)
    return codes.reshape(values.shape), absmax


def dequantize_dynamic_8bit(codes: torch.Tensor, absmax: torch.Tensor, blocksize: int) -> torch.Tensor:
    flat = codes.reshape(-1).long()
    scale = absmax.repeat_interleave(blocksize)[: flat.numel()]
    return (_on("dynamic", codes.device)[flat] * scale).reshape(codes.shape)
