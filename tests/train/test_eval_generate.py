"""training.eval_generate: exact match of greedy answers on N eval examples at each evaluation,
in metrics.jsonl, the progress line and the loss-curve plot."""

from __future__ import annotations

import json

import pytest
from tiny_models import tiny_chat_model_and_tokenizer

from tuneforge.config import parse_train_config
from tuneforge.errors import ConfigError, DataError
from tuneforge.eval import generation
from tuneforge.train import train
from tuneforge.train.metrics import curve_series, read_metrics


@pytest.fixture(autouse=True)
def _single_thread(one_torch_thread):
    yield


def config(tmp_path, data=None, **training):
    return parse_train_config({
        "output_dir": str(tmp_path / "run"),
        "adapter": {"r": 4},
        "data": {"train": "arithmetic", "options": {"size": 16}, "max_seq_len": 160, "eval_size": 6, **(data or {})},
        "training": {"max_steps": 4, "batch_size": 4, "lr": 5e-3, "eval_every": 2, "eval_generate": 4, **training},
    })


def test_exact_match_is_recorded_at_each_evaluation(tmp_path, monkeypatch, capsys):
    asked = []

    def half_right(model, tokenizer, examples, **options):  # right on the first half of what it is asked
        asked.append(len(examples))
        return [generation.gold_answer(e) if i < len(examples) // 2 else "no idea" for i, e in enumerate(examples)]

    monkeypatch.setattr(generation, "generate_answers", half_right)
    summary = train(config(tmp_path), model_and_tokenizer=tiny_chat_model_and_tokenizer())
    records = [r for r in read_metrics(summary.run_dir / "metrics.jsonl") if "eval_loss" in r]
    assert [r["step"] for r in records] == [0, 2, 4]
    assert asked == [4, 4, 4], "eval_generate=4 of the 6 eval examples"
    assert all(r["eval_exact_match"] == 0.5 and r["eval_generated"] == 4 for r in records)
    shown = capsys.readouterr().err
    assert "exact match 50.0% of 4" in shown  # the evaluation's line
    assert "step 4/4  loss" in shown and "eval exact match 50.0%" in shown.split("step 4/4")[1]  # the step line
    assert curve_series(read_metrics(summary.run_dir / "metrics.jsonl"))["eval_exact_match"] == [(0, 0.5), (2, 0.5), (4, 0.5)]


def test_a_real_model_generates_on_the_users_eval_file(tmp_path):
    eval_file = tmp_path / "held_out.jsonl"
    rows = [{"messages": [{"role": "user", "content": f"Tom has {n} apples. How many apples does Tom have now?"},
                          {"role": "assistant", "content": str(n)}]} for n in range(5)]
    eval_file.write_text("".join(json.dumps(row) + "\n" for row in rows))
    cfg = config(tmp_path, data={"eval": str(eval_file), "eval_size": None}, max_steps=2, eval_generate=3)
    summary = train(cfg, model_and_tokenizer=tiny_chat_model_and_tokenizer())
    records = [r for r in read_metrics(summary.run_dir / "metrics.jsonl") if "eval_loss" in r]
    assert [r["eval_generated"] for r in records] == [3, 3]
    assert all(0 <= r["eval_exact_match"] <= r["eval_contains"] <= 1 for r in records)
    assert (summary.run_dir / "loss_curve.png").read_bytes()[:4] == b"\x89PNG"


def test_eval_generate_without_held_out_data_fails_before_the_model_loads(tmp_path):
    train_file = tmp_path / "train.jsonl"
    train_file.write_text(json.dumps({"prompt": "Hi", "completion": "Hello"}) + "\n")
    cfg = config(tmp_path, data={"train": str(train_file), "options": {}})
    with pytest.raises(ConfigError, match="training.eval_generate=4 needs held-out examples.*data.eval"):
        train(cfg, model_and_tokenizer=None)  # None: loading the default model would be the failure
    assert not (tmp_path / "run").exists()


def test_eval_generate_on_plain_text_is_a_data_error(tmp_path):
    eval_file = tmp_path / "text.jsonl"
    eval_file.write_text(json.dumps({"text": "Hello there, how are you today?"}) + "\n")
    with pytest.raises(DataError, match="final assistant turn.*plain text"):
        train(config(tmp_path, data={"eval": str(eval_file), "eval_size": None}),
              model_and_tokenizer=tiny_chat_model_and_tokenizer())
    assert not (tmp_path / "run").exists()
