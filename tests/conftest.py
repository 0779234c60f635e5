"""Fixtures shared by every test folder."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def cpu_without_native_bf16(monkeypatch):
    """Every test sees a CPU without bf16 units, so ``precision: auto`` means fp32 on any machine and
    results do not depend on the CPU the suite runs on; tests of the choice fake other CPUs."""
    monkeypatch.setattr("tuneforge.models.precision.cpu_multiplies_bf16_natively", lambda: False)


@pytest.fixture
def one_torch_thread():
    """Run a test on one intra-op thread, then restore the setting.

    Tiny models spend their time in per-op overhead, so a second thread buys nothing; and when
    other jobs share the cores, threads waiting on each other made a side-by-side eval test 50x
    slower (0.3 s on one thread, 15 s on two, measured on a 2-core machine under load)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
