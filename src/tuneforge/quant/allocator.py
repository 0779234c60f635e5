"""Keep glibc from hoarding the dequantization buffers of quantized layers.

A quantized layer dequantizes its weight in chunks of ~16 MB in every forward and backward. glibc
serves allocations that size with ``mmap`` at first, but raises its threshold after such blocks are
freed (up to 32 MB), so later chunks come from the heap, where freed memory fragments and is not given
back: measured on a 6-layer 2048-wide Llama, resident memory grew by ~600 MB over two QLoRA steps.
Fixing the threshold at 1 MB keeps every large buffer in its own mapping, returned on free (the same
run then stays flat, 0.64x the peak). Process-wide and harmless for small allocations; a no-op where
the C library is not glibc.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

M_MMAP_THRESHOLD = -3  # mallopt parameter number in glibc's malloc.h
THRESHOLD_BYTES = 1 << 20
_done = False


def return_large_buffers_to_os() -> bool:
    """Fix glibc's mmap threshold at 1 MB (once per process); True if it was applied."""
    global _done
    if _done or not sys.platform.startswith("linux"):
        return _done
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        _done = bool(libc.mallopt(M_MMAP_THRESHOLD, THRESHOLD_BYTES))
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to tune
        _done = False
    return _done
