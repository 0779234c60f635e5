"""``training.cpu_memory: lean``: memory freed during a step goes back to the OS (glibc only).

glibc's malloc serves a large block with its own memory map only above a threshold, and raises that
threshold (up to 32 MiB on 64-bit) each time such a block is freed. After the first freed gradient,
weight-sized blocks (4-16 MiB on a 0.5B model) therefore come from the heap, and what a step frees
there stays resident, fragmented, and counts in the process's peak. Fixing the threshold with
``mallopt(M_MMAP_THRESHOLD, n)`` stops the adjustment: every block above n bytes is mapped on its own
and unmapped when freed. The price is a page fault per fresh page of each large block.

Measured on the random 0.5B Llama, 3 steps (docs/full_finetuning.md): per-layer GaLore peaks at
3923 MiB instead of 4482, AdamW at 7329 instead of 7708.
"""

from __future__ import annotations

import ctypes
import ctypes.util

M_MMAP_THRESHOLD = -3  # glibc's malloc.h
LEAN_THRESHOLD_BYTES = 128 * 1024  # glibc's own starting threshold, made fixed


def use_lean_cpu_allocator(threshold_bytes: int = LEAN_THRESHOLD_BYTES) -> bool:
    """Fix glibc's mmap threshold for the rest of the process; False where there is no glibc mallopt
    (musl, macOS), which leaves the allocator as it is. Blocks already allocated are not affected."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return bool(mallopt(M_MMAP_THRESHOLD, threshold_bytes))
