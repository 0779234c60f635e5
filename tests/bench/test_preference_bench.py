"""bench/preference.py smoke: both sides (tuneforge DPO, TRL DPOTrainer + peft) run on a tiny saved model."""

from __future__ import annotations

import json

import pytest
from bench_scripts import load_bench_script
from tiny_models import save_tiny_chat_model

pytest.importorskip("trl")


def test_both_sides_train_the_same_number_of_steps(tmp_path):
    bench = load_bench_script("preference")
    save_tiny_chat_model(tmp_path / "tiny")
    row = bench.main(["--model", str(tmp_path / "tiny"), "--steps", "2", "--pairs-per-step", "2", "--max-seq-len", "192",
                      "--workdir", str(tmp_path / "work"), "--output", str(tmp_path / "row.json")])
    assert row["tuneforge"]["steps"] == row["trl"]["steps"] == 2
    assert row["speedup"] > 0 and row["memory_ratio"] > 0
    assert json.loads((tmp_path / "row.json").read_text())["model"] == str(tmp_path / "tiny")
