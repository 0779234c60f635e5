"""bench/preference.py smoke: both sides (tuneforge DPO, TRL DPOTrainer + peft) run on a tiny saved model."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
from tiny_models import tiny_chat_model_and_tokenizer

pytest.importorskip("trl")

BENCH_SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "preference.py"


def test_both_sides_train_the_same_number_of_steps(tmp_path):
    spec = importlib.util.spec_from_file_location("preference_bench", BENCH_SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench
    spec.loader.exec_module(bench)
    model, tokenizer = tiny_chat_model_and_tokenizer()
    model.save_pretrained(tmp_path / "tiny")
    tokenizer.save_pretrained(tmp_path / "tiny")
    row = bench.main(["--model", str(tmp_path / "tiny"), "--steps", "2", "--pairs-per-step", "2", "--max-seq-len", "192",
                      "--workdir", str(tmp_path / "work"), "--output", str(tmp_path / "row.json")])
    assert row["tuneforge"]["steps"] == row["trl"]["steps"] == 2
    assert row["speedup"] > 0 and row["memory_ratio"] > 0
    assert json.loads((tmp_path / "row.json").read_text())["model"] == str(tmp_path / "tiny")
