"""bench/coserve.py smoke run on a random 2-layer Llama: every phase runs and the report adds up."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.usefixtures("one_torch_thread")

BENCH_SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "coserve.py"


def load_bench():
    spec = importlib.util.spec_from_file_location("coserve_bench", BENCH_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_coserve_bench_smoke_on_a_tiny_model(capsys):
    bench = load_bench()
    assert bench.main(["--tiny", "--clients", "2", "--steps", "3", "--batch-size", "2", "--seconds", "1",
                       "--new-tokens", "4"]) == 0
    output = capsys.readouterr().out
    report = json.loads(output[: output.rindex("}") + 1])
    assert report["train_ratio"] == pytest.approx(report["train_under_load_tokens_per_s"]
                                                  / report["train_alone_tokens_per_s"])
    assert report["serve_alone"]["requests"] > 0 and report["serve_with_job"]["requests"] > 0
    assert report["p50_ratio"] == pytest.approx(report["serve_with_job"]["p50_s"] / report["serve_alone"]["p50_s"])
    assert "goal: job under load >= 60% of alone" in output
