"""bitsandbytes' dequantization kernels as an optional fast path for 4-bit weights.

Our 4-bit state *is* bitsandbytes' format (blockwise.py), so its ``dequantize_4bit`` kernel can decode
our tensors directly, with the same values bit for bit as the pure-torch path (tests/quant/
test_quant_bnb_backend.py). bitsandbytes is never required: it is imported on first use, never at
tuneforge import time, and any failure to import it means "not available".

``TUNEFORGE_QUANT_BACKEND`` picks the path:

    auto          (default) bitsandbytes where its native kernel runs for the tensors' device, else torch
    torch         always the pure-torch path
    bitsandbytes  always bitsandbytes (an error if it cannot be imported)

float64 output always takes the torch path: no bitsandbytes kernel writes it.

On CPU, auto takes bitsandbytes too. Measured on a 2048x5632 NF4 weight (double quant, one thread,
AVX2, medians): the whole weight in bfloat16 in 21 ms instead of ~100 ms, and a float32 forward +
backward of 64 tokens through QuantLinear in 68 ms instead of 111 ms. The values are the same either way.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import warnings
from functools import cache

import torch

from tuneforge.errors import ConfigError
from tuneforge.quant.blockwise import ABSMAX_BLOCKSIZE, QuantState, row_blocks

BACKEND_VARIABLE = "TUNEFORGE_QUANT_BACKEND"
BACKENDS = ("auto", "torch", "bitsandbytes")
DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # what bitsandbytes' 4-bit kernels can write


def backend_setting() -> str:
    """The backend ``TUNEFORGE_QUANT_BACKEND`` asks for (read on every call, so it can change at run time)."""
    value = os.environ.get(BACKEND_VARIABLE, "auto").strip().lower() or "auto"
    if value not in BACKENDS:
        raise ConfigError(f"{BACKEND_VARIABLE}={os.environ[BACKEND_VARIABLE]!r} is not a quantization backend; "
                          f"choose one of {', '.join(BACKENDS)} (or unset it for auto)")
    return value


@contextlib.contextmanager
def _silenced():
    """Swallow what importing bitsandbytes may print, warn or log (e.g. on a machine without its CUDA libraries)."""
    logger = logging.getLogger("bitsandbytes")
    level = logger.level
    logger.setLevel(logging.CRITICAL + 1)
    try:
        with (contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()),
              warnings.catch_warnings()):
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


@cache
def _load():
    """(bitsandbytes.functional, bitsandbytes.cextension), or (None, why not); imported once."""
    try:
        with _silenced():
            import bitsandbytes.functional as functional
            from bitsandbytes import cextension
    except Exception as error:  # a missing package, missing CUDA libraries, an ABI mismatch: all mean "not here"
        return None, f"{type(error).__name__}: {error}"
    return functional, cextension


def has_native_kernel(device: torch.device, blocksize: int = 64) -> bool:
    """Whether bitsandbytes imports and runs its own compiled 4-bit dequantize kernel for ``device``.

    Elsewhere it falls back to PyTorch code of its own, which is no faster than ours and decodes FP4's
    negative zero as +0.0, so auto never picks it.
    """
    functional, cextension = _load()
    if functional is None:
        return False
    if device.type == "cuda":
        return isinstance(cextension.lib, cextension.CudaBNBNativeLibrary)
    if device.type == "cpu":
        # bitsandbytes' CPU backend skips its C++ kernel for blocksize >= 2048 on AVX-512 (backends/cpu/ops.py)
        avx512_fallback = torch.backends.cpu.get_cpu_capability() == "AVX512" and blocksize >= 2048
        return not isinstance(cextension.lib, cextension.ErrorHandlerMockBNBNativeLibrary) and not avx512_fallback
    return False


def use_bitsandbytes(state: QuantState, dtype: torch.dtype) -> bool:
    """Whether dequantizing ``state`` to ``dtype`` goes through bitsandbytes under the current setting."""
    setting = backend_setting()
    if setting == "torch" or dtype not in DTYPES:
        return False
    if setting == "bitsandbytes":
        functional, why_not = _load()
        if functional is None:
            raise ConfigError(f"{BACKEND_VARIABLE}=bitsandbytes, but bitsandbytes cannot be imported here ({why_not}); "
                              "install it (pip install bitsandbytes) or set the variable to auto or torch")
        return True
    return has_native_kernel(state.packed.device, state.blocksize)


def dequantize_rows(state: QuantState, start: int, stop: int, dtype: torch.dtype) -> torch.Tensor:
    """Rows [start, stop) of a 2-D quantized weight, (stop - start, columns), decoded by bitsandbytes.

    Like blockwise.dequantize_rows: the kernel decodes the whole blocks that hold the rows, and the
    rows are a view into them, so a range need not start or end on a block boundary.
    """
    columns = state.shape[-1]
    first_block, stop_block, offset = row_blocks(state, start, stop)
    values = _dequantize_blocks(state, first_block, stop_block, dtype)
    return values[offset: offset + (stop - start) * columns].view(stop - start, columns)


def _dequantize_blocks(state: QuantState, first: int, stop: int, dtype: torch.dtype) -> torch.Tensor:
    """The values of blocks [first, stop) of the flattened tensor, in ``dtype`` (the last block may run short)."""
    functional, _ = _load()
    start = first * state.blocksize
    end = min(stop * state.blocksize, state.numel)
    packed = state.packed[start // 2: (end + 1) // 2]  # a view: blocksize is even, so start is byte-aligned
    absmax = state.absmax[first:stop] if state.double_quant is None else _absmax(functional, state, first, stop)
    # Ask for every nibble of the bytes (an even count): bitsandbytes' CPU backend sends an odd last
    # dimension to a slower PyTorch fallback. A trailing pad nibble lies in the last block; it is cut off.
    shape = torch.Size((2 * packed.numel(),))
    bnb_state = functional.QuantState(absmax=absmax, shape=shape, dtype=dtype, blocksize=state.blocksize,
                                      quant_type=state.quant_type)
    return functional.dequantize_4bit(packed, bnb_state).reshape(-1)[: end - start]


def _absmax(functional, state: QuantState, first: int, stop: int) -> torch.Tensor:
    """float32 absmax of blocks [first, stop), undoing double quantization with bitsandbytes' 8-bit kernel.

    The second level quantizes the absmax in groups of 256 blocks counted from block 0, so decoding
    starts at the group holding ``first`` (at most 255 extra bytes) and the head is cut off after.
    """
    group, stop_group = first // ABSMAX_BLOCKSIZE, -(-stop // ABSMAX_BLOCKSIZE)
    codes = state.absmax[group * ABSMAX_BLOCKSIZE: stop]
    second = state.double_quant.absmax[group:stop_group]
    absmax = functional.dequantize_blockwise(codes, absmax=second, blocksize=ABSMAX_BLOCKSIZE)  # dynamic map
    absmax += state.double_quant.offset  # the same two steps, in the same order, as bitsandbytes' dequantize_4bit
    return absmax[first - group * ABSMAX_BLOCKSIZE:]
