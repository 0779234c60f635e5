"""``training.cpu_memory: lean`` (train/allocator.py): freed blocks go back to the OS.

Oracle: the process's own resident set. Each case runs in a fresh interpreter, since the setting
lasts for the whole process. After a 16 MiB block is freed, glibc serves 8 MiB blocks from the heap;
freeing all but the last leaves them resident (the last one pins the heap's top). With the threshold
fixed, each block has its own mapping and freeing it returns its pages.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

PROBE = """
import sys
import torch
from tuneforge.train.allocator import use_lean_cpu_allocator

def rss_mib():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024

if sys.argv[1] == "lean" and not use_lean_cpu_allocator():
    print("no mallopt")
    raise SystemExit(0)
big = torch.ones(4 * 1024 * 1024)  # 16 MiB: freeing it raises glibc's threshold above 8 MiB
del big
before = rss_mib()
blocks = [torch.ones(2 * 1024 * 1024) for _ in range(24)]  # 24 x 8 MiB, every page touched
del blocks[:-1]
print(rss_mib() - before)
"""


def resident_growth_mib(mode: str) -> float:
    done = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    last = done.stdout.strip().splitlines()[-1]
    if last == "no mallopt":
        pytest.skip("no glibc mallopt here (e.g. musl)")
    return float(last)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's /proc/self/status and mallopt")
def test_lean_allocator_returns_freed_blocks_to_the_os():
    lean, default = resident_growth_mib("lean"), resident_growth_mib("default")
    assert default > 150  # 23 freed blocks (184 MiB) stayed resident
    assert lean < 40  # only the block still alive (8 MiB), plus noise
