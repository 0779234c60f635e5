"""bench/continual.py smoke run: two methods on a two-task stream with a tiny model; the summary's
numbers are the streams' own reports, and the goal line is computed from them."""

from __future__ import annotations

import json

import pytest
from bench_scripts import load_bench_script
import yaml

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_continual_bench_smoke_on_a_tiny_model(tmp_path, monkeypatch, capsys):
    from tiny_models import tiny_chat_model_and_tokenizer

    bench = load_bench_script("continual")
    monkeypatch.setattr(bench, "tiny_model", lambda name: tiny_chat_model_and_tokenizer())
    config = tmp_path / "stream.yaml"
    config.write_text(yaml.safe_dump({
        "tasks": [{"data": "unit_conversion"}, {"data": "string_reversal"}], "max_new_tokens": 2,
        "probe": {"data": "bundled", "size": 2},
        "train": {"adapter": {"r": 4}, "data": {"max_seq_len": 96}, "training": {"batch_size": 4, "log_every": 100}}}))
    out = tmp_path / "bench"
    assert bench.main(["--config", str(config), "--tiny", "--methods", "sequential", "joint", "--steps", "1",
                       "--train-size", "4", "--eval-size", "1", "--output", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    for method in ("sequential", "joint"):
        report = json.loads((out / method / "report.json").read_text())
        assert summary["methods"][method]["R"] == report["R"]
    assert len(summary["methods"]["sequential"]["R"]) == 2 and len(summary["methods"]["joint"]["R"]) == 1
    assert summary["goal"].startswith("goal (BWT >= -2 points") and "best method sequential" in summary["goal"]
    assert "| sequential |" in (out / "summary.md").read_text()
    capsys.readouterr()
