"""Which precision the hardware runs fastest, and the autocast / loss-scaler that apply it.

Train, eval and the objectives all enter the forward pass through ``autocast`` here, so one rule
decides everywhere. ``training.precision: auto`` and ``dtype: auto`` resolve by ``choose_precision``:

    CUDA device that supports bf16        -> bf16 autocast, bfloat16 base weights
    CUDA device without bf16 (pre-Ampere) -> fp16 autocast with a GradScaler, float32 base weights
    CPU that multiplies bf16 natively     -> bf16 autocast, bfloat16 base weights
      (AVX512_BF16 or AMX-BF16)
    any other CPU                         -> fp32, float32 base weights

Adapter weights stay float32 masters whatever the base dtype (they are created in float32 and
``LoraLinear`` casts its input to them). Why not bf16 on every CPU: without bf16 units torch falls
back to converting element by element (bf16 backward measured 0.3 GFLOP/s on an AVX2 machine,
issue 24), while on an AVX512_BF16 machine bf16 autocast trained 1.4x faster than float32.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
# Linux /proc/cpuinfo flag names of the units that multiply bf16 in hardware.
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")
# What the bench prints next to its numbers.
REPORTED_CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")


@dataclass(frozen=True)
class PrecisionChoice:
    precision: str  # fp32, bf16 or fp16: the autocast of the forward pass
    weights_dtype: str  # float32, bfloat16 or float16: the base weights
    reason: str  # why, in a few words, for the log line

    def describe(self) -> str:
        return f"precision {self.precision}, base weights {self.weights_dtype} ({self.reason})"


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags as Linux lists them in /proc/cpuinfo (empty elsewhere)."""
    try:
        return parse_cpu_flags(Path("/proc/cpuinfo").read_text())
    except OSError:
        return frozenset()


def parse_cpu_flags(cpuinfo: str) -> frozenset[str]:
    """The first processor's ``flags`` (x86) or ``Features`` (arm) line of /proc/cpuinfo text."""
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


def cpu_multiplies_bf16_natively() -> bool:
    """True on CPUs with AVX512_BF16 or AMX-BF16.

    torch 2.1-2.4 exposed ``torch._C._cpu._is_avx512_bf16_supported`` / ``_is_amx_tile_supported``;
    torch 2.13 has neither (``torch.backends.cpu.get_cpu_capability()`` only names the vector width,
    "AVX512" with or without bf16), so the query is used where it exists and the flags otherwise.
    """
    query = getattr(torch._C, "_cpu", None)
    bf16_query = getattr(query, "_is_avx512_bf16_supported", None)
    amx_query = getattr(query, "_is_amx_tile_supported", None)
    if bf16_query is not None and amx_query is not None:
        return bool(bf16_query() or amx_query())
    return any(flag in cpu_flags() for flag in BF16_CPU_FLAGS)


def cuda_supports_bf16(device: torch.device) -> bool:
    """Whether the CUDA device computes in bf16 (compute capability 8.0+, i.e. Ampere and later)."""
    return torch.cuda.get_device_capability(device)[0] >= 8


def choose_precision(precision: str, dtype: str, device: torch.device | str,
                     trains_base_weights: bool = False) -> PrecisionChoice:
    """Resolve ``training.precision`` and the base ``dtype`` (either may be ``auto``) for ``device``.

    An explicit setting wins. ``dtype: auto`` follows the resolved precision: bfloat16 weights only
    under bf16 autocast (an fp32 run keeps float32 weights, an fp16 run float32 masters under its
    GradScaler), and never for weights that train (full finetuning): those are the optimizer's
    masters, and bf16's 8-bit mantissa would round most small updates away."""
    device = torch.device(device)
    reason = "as configured"
    if precision == "auto":
        precision, reason = _hardware_precision(device)
    if dtype == "auto":
        dtype = "bfloat16" if precision == "bf16" and not trains_base_weights else "float32"
    return PrecisionChoice(precision, dtype, reason)


def _hardware_precision(device: torch.device) -> tuple[str, str]:
    if device.type == "cuda":
        if cuda_supports_bf16(device):
            return "bf16", "auto: this GPU computes in bf16"
        return "fp16", "auto: this GPU has no bf16, fp16 with loss scaling"
    if device.type == "cpu" and cpu_multiplies_bf16_natively():
        return "bf16", "auto: this CPU multiplies bf16 natively (AVX512_BF16/AMX)"
    return "fp32", f"auto: this {device.type.upper()} has no native bf16 matmul"


def without_loss_scaler(choice: PrecisionChoice, asked: str) -> PrecisionChoice:
    """An update rule with no loss scaler (LOMO, MeZO) cannot take fp16 picked by ``auto``: fp32 instead.
    (An explicit fp16 with those rules is refused by the config check.)"""
    if asked != "auto" or choice.precision != "fp16":
        return choice
    return PrecisionChoice("fp32", choice.weights_dtype, choice.reason + "; fp32, since this update rule has no loss scaler")


def autocast(precision: str, device: torch.device):
    """The forward pass's autocast (fp32: none; auto: what ``choose_precision`` picks for ``device``)."""
    if precision == "auto":
        precision = choose_precision("auto", "auto", device).precision
    if precision == "fp32":
        return contextlib.nullcontext()
    # No cast cache: it keeps a low-precision copy of every trainable weight (each adapter factor,
    # used once per forward) until the forward ends, which only adds to the step's peak memory.
    return torch.autocast(device_type=device.type, dtype=AUTOCAST_DTYPES[precision], cache_enabled=False)


def loss_scaler(precision: str, device: torch.device) -> torch.amp.GradScaler | None:
    """A GradScaler for a resolved fp16 precision, else None. fp16's range ends at 65504 and its small gradients flush to zero: scale the loss (and unscale
    the gradients before clipping) as Micikevicius et al. 2018 §3.2 describe. bf16 has fp32's range."""
    return torch.amp.GradScaler(device.type) if precision == "fp16" else None
