"""bench/coserve.py smoke run on a random 2-layer Llama: every phase runs and the report adds up."""

from __future__ import annotations

import json

import pytest
from bench_scripts import load_bench_script

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_coserve_bench_smoke_on_a_tiny_model(capsys):
    bench = load_bench_script("coserve")
    assert bench.main(["--tiny", "--clients", "2", "--steps", "3", "--batch-size", "2", "--seconds", "1",
                       "--new-tokens", "4"]) == 0
    output = capsys.readouterr().out
    report = json.loads(output[: output.rindex("}") + 1])
    assert report["train_ratio"] == pytest.approx(report["train_under_load_tokens_per_s"]
                                                  / report["train_alone_tokens_per_s"])
    assert report["serve_alone"]["requests"] > 0 and report["serve_with_job"]["requests"] > 0
    assert report["p50_ratio"] == pytest.approx(report["serve_with_job"]["p50_s"] / report["serve_alone"]["p50_s"])
    assert "goal: job under load >= 60% of alone" in output
