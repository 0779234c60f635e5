"""bitsandbytes' dequantization kernels as an optional fast path for 4-bit weights.

Our 4-bit state *is* bitsandbytes' format (blockwise.py), so its ``dequantize_4bit`` kernel can decode
our tensors directly. bitsandbytes is never required: it is imported on first use, never at tuneforge
import time, and any failure to import it means "not available".

The ground truth of a decode is its definition, ``codebook[code] * absmax[block]`` (blockwise.py), not
bitsandbytes' output: its CPU kernels differ by instruction set. On an AVX-512 CPU, bitsandbytes
0.50.2 decodes wrong values when a tensor's size is not a multiple of the blocksize and decodes
FP4's negative zero (code 0b1000) as +0.0 (issue 15). So before ``auto`` uses bitsandbytes for a
(device, quant type, blocksize), it decodes a small probe once per process, holding a partial last
block, every code (FP4's -0.0 included) and a double-quantized absmax, in every output dtype, and
compares the bits with the pure-torch path (``kernel_check``).

``TUNEFORGE_QUANT_BACKEND`` picks the path:

    auto          (default) bitsandbytes where its native kernel runs for the tensors' device and
                  decodes the probe bit for bit as the definition does; else torch, with one
                  warning line naming the difference
    torch         always the pure-torch path
    bitsandbytes  always bitsandbytes: an error if it cannot be imported, or if it decodes the probe
                  to different numbers (a sign-of-zero difference alone is allowed: equal as numbers)

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
from dataclasses import dataclass
from functools import cache

import torch

from tuneforge.errors import ConfigError
from tuneforge.quant import blockwise
from tuneforge.quant.blockwise import ABSMAX_BLOCKSIZE, DoubleQuant, QuantState, row_blocks

BACKEND_VARIABLE = "TUNEFORGE_QUANT_BACKEND"
BACKENDS = ("auto", "torch", "bitsandbytes")
DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # what bitsandbytes' 4-bit kernels can write

logger = logging.getLogger(__name__)


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
    device, quant_type, blocksize = state.packed.device, state.quant_type, state.blocksize
    if setting == "bitsandbytes":
        functional, why_not = _load()
        if functional is None:
            raise ConfigError(f"{BACKEND_VARIABLE}=bitsandbytes, but bitsandbytes cannot be imported here ({why_not}); "
                              "install it (pip install bitsandbytes) or set the variable to auto or torch")
        check = kernel_check(device, quant_type, blocksize)
        if not check.equal_as_numbers:  # forced, but it would hand the model wrong weights
            raise ConfigError(f"{BACKEND_VARIABLE}=bitsandbytes, but bitsandbytes' dequantize_4bit on this machine "
                              f"({_machine(device)}) decodes {quant_type} at blocksize {blocksize} to other values "
                              f"than the format defines ({check.detail}); set {BACKEND_VARIABLE}=auto, which then "
                              "takes the pure-torch decode, or torch")
        return True
    if not has_native_kernel(device, blocksize):
        return False
    check = kernel_check(device, quant_type, blocksize)
    if not check.exact:
        _log_fallback(device, quant_type, blocksize, check.detail)
    return check.exact


@dataclass(frozen=True)
class KernelCheck:
    """How bitsandbytes decoded the probe, compared with the definition (the pure-torch path)."""

    exact: bool  # every value has the definition's bits
    equal_as_numbers: bool  # every value is the definition's number (only the sign of a zero may differ)
    detail: str  # what differed, in words ("" when exact)


@cache
def kernel_check(device: torch.device, quant_type: str, blocksize: int) -> KernelCheck:
    """Decode a probe with bitsandbytes and compare its bits with the definition; once per process.

    The probe holds what bitsandbytes' kernels are known to get wrong on some instruction set: a
    partial last block of odd length, every code in every block (FP4's -0.0, code 0b1000, included),
    and a double-quantized absmax whose 256-block group is partial; it is decoded in every output dtype.
    """
    for double_quant in (False, True):
        state = _probe_state(device, quant_type, blocksize, double_quant)
        for dtype in DTYPES:
            where = f"{str(dtype).removeprefix('torch.')}, {'double-quantized' if double_quant else 'plain'} absmax"
            expected = blockwise.dequantize_4bit(state, dtype)
            try:
                actual = _dequantize_blocks(state, 0, state.blocks, dtype)
            except Exception as error:  # a kernel that fails on the probe is as unusable as a wrong one
                return KernelCheck(False, False, f"{where}: {type(error).__name__}: {error}")
            if actual.shape != expected.shape or actual.dtype != expected.dtype:
                return KernelCheck(False, False, f"{where}: got {actual.dtype} {tuple(actual.shape)} instead of "
                                                 f"{expected.dtype} {tuple(expected.shape)}")
            check = _compare(actual, expected, where)
            if not check.exact:
                return check
    return KernelCheck(True, True, "")


def forget_kernel_checks() -> None:
    """Run the probe again on next use (tests that swap the kernel call this before and after)."""
    kernel_check.cache_clear()
    _log_fallback.cache_clear()


def _compare(actual: torch.Tensor, expected: torch.Tensor, where: str) -> KernelCheck:
    as_integers = {2: torch.int16, 4: torch.int32}[expected.element_size()]
    differ = actual.view(as_integers) != expected.view(as_integers)
    if not differ.any():
        return KernelCheck(True, True, "")
    count = f"{int(differ.sum())} of {differ.numel()} values"
    wrong = actual != expected  # as numbers: -0.0 == +0.0
    if not wrong.any():
        return KernelCheck(False, True, f"{where}: {count} differ only in the sign of zero (FP4's -0.0 as +0.0)")
    index = int(wrong.nonzero()[0])
    return KernelCheck(False, False, f"{where}: {count} differ, first at element {index}: "
                                     f"{float(actual[index]):.6g} instead of {float(expected[index]):.6g}")


def _probe_state(device: torch.device, quant_type: str, blocksize: int, double_quant: bool) -> QuantState:
    """Two whole blocks and a partial one of odd length; codes cycle through all 16 in every block."""
    numel = 2 * blocksize + blocksize // 2 + 1
    codes = torch.arange(numel + 1) * 7 % 16  # 7 is coprime to 16: any 16 in a row are all the codes
    packed = ((codes[0::2] << 4) | codes[1::2]).to(torch.uint8)  # the last low nibble is padding
    state = QuantState(packed=packed.to(device), absmax=torch.tensor([0.0173, 2.71, 3.1e-3], device=device),
                       shape=torch.Size([numel]), dtype=torch.float32, blocksize=blocksize, quant_type=quant_type)
    if double_quant:  # three absmax codes: a partial group of the 256-block second level
        state.absmax = torch.tensor([37, 201, 128], dtype=torch.uint8, device=device)
        state.double_quant = DoubleQuant(absmax=torch.tensor([0.0417], device=device),
                                         offset=torch.tensor(0.6, device=device))
    return state


def _machine(device: torch.device) -> str:
    if device.type == "cpu":
        return f"cpu, {torch.backends.cpu.get_cpu_capability()}"
    return str(device)


@cache
def _log_fallback(device: torch.device, quant_type: str, blocksize: int, detail: str) -> None:
    """One line per (device, quant type, blocksize) and process: the result stays right, only slower."""
    logger.warning("bitsandbytes' dequantize_4bit on %s disagrees with the %s definition at blocksize %d (%s); "
                   "decoding with the pure-torch path instead (same values as defined, slower). "
                   "Set %s=torch to skip this check.", _machine(device), quant_type, blocksize, detail,
                   BACKEND_VARIABLE)


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
