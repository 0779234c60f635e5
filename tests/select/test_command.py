"""`tuneforge select` end to end, and `data.select` in a training run."""

from __future__ import annotations

import csv
import json

import pytest
from tiny_models import tiny_chat_model_and_tokenizer

from tuneforge.cli import main
from tuneforge.config import parse_train_config
from tuneforge.data import load_examples
from tuneforge.errors import ConfigError
from tuneforge.select.pool import load_pool
from tuneforge.train import train


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_select_command_writes_the_kept_examples_and_a_report(tmp_path):
    records = [{"prompt": f"Question number {i}?", "completion": "x" * (i + 1)} for i in range(10)]
    records.append({"prompt": "question number 3", "completion": "xxxx"})  # a duplicate of record 4
    data = write_jsonl(tmp_path / "data.jsonl", records)
    output, report = tmp_path / "selected.jsonl", tmp_path / "report"
    assert main(["select", str(data), "--strategy", "dedup+length", "--budget", "3", "--output", str(output),
                 "--report", str(report)]) == 0
    kept = load_examples(output).examples  # the output reads back as training data
    assert [e.messages[-1].content for e in kept] == ["x" * 8, "x" * 9, "x" * 10]
    rows = list(csv.DictReader((report / "selection.csv").open()))
    assert len(rows) == 11 and sum(row["kept"] == "True" for row in rows) == 3
    assert rows[10]["reason"] == "dedup: dropped: duplicate of example 4 (cluster 1, 2 members)"
    summary = json.loads((report / "summary.json").read_text())
    assert summary["kept"] == 3 and [s["strategy"] for s in summary["stages"]] == ["dedup", "length"]
    assert all(s["seconds_per_1k_examples"] >= 0 for s in summary["stages"])
    assert summary["details"]["dedup"]["clusters"] == [[3, 10]]
    assert (report / "scores.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "## Dropped (8" in (report / "selection.md").read_text()


def test_select_command_reads_a_bundled_dataset_with_its_options(tmp_path):
    output = tmp_path / "selected.jsonl"
    assert main(["select", "arithmetic", "--data-option", "size=20", "--strategy", "random", "--budget", "5",
                 "--output", str(output)]) == 0
    assert len(load_examples(output).examples) == 5


def test_candidate_records_load_as_a_candidate_pool(tmp_path):
    data = write_jsonl(tmp_path / "c.jsonl", [{"instruction": "Add", "input": "2 and 3", "candidates": ["5", "six"]},
                                               {"prompt": "Say hi", "candidates": ["hi"]}])
    pool = load_pool(data)
    assert pool.candidates == [["5", "six"], ["hi"]]
    assert pool.examples[0].messages[0].content == "Add\n\n2 and 3"
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "x", "candidates": []}])
    with pytest.raises(Exception, match="non-empty list"):
        load_pool(bad)


def run_config(tmp_path, select: dict, name="run"):
    return parse_train_config({
        "output_dir": str(tmp_path / name), "adapter": {"r": 4},
        "data": {"train": "arithmetic", "options": {"size": 24}, "max_seq_len": 128, "eval_size": 0, "select": select},
        "training": {"max_steps": 2, "batch_size": 4, "log_every": 1},
    })


def test_training_selects_first_and_records_why(tmp_path, one_torch_thread):
    config = run_config(tmp_path, {"strategy": "length", "budget": 6})
    summary = train(config, model_and_tokenizer=tiny_chat_model_and_tokenizer())
    selection_dir = summary.run_dir / "selection"
    kept = load_examples(selection_dir / "selected.jsonl").examples
    assert len(kept) == 6
    all_lengths = sorted((len(e.messages[-1].content) for e in load_examples("arithmetic", size=24).examples), reverse=True)
    assert sorted((len(e.messages[-1].content) for e in kept), reverse=True) == all_lengths[:6]
    rows = list(csv.DictReader((selection_dir / "selection.csv").open()))
    assert len(rows) == 24 and all(row["reason"] for row in rows)
    assert json.loads((selection_dir / "summary.json").read_text())["strategy"] == "length"


def test_training_refuses_a_bad_selection_before_loading_the_model(tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before data.select was checked")

    monkeypatch.setattr("tuneforge.models.load_model", refuse)
    with pytest.raises(ConfigError, match="larger than the data"):
        train(run_config(tmp_path, {"strategy": "ifd", "budget": 500}))
    with pytest.raises(ConfigError, match="unknown key"):
        run_config(tmp_path, {"strategy": "ifd", "budgte": 5})
