"""bench/data_selection.py on the tiny model: the mixture holds what it says it injected, every row is
recorded with consistent counts, and a rerun resumes from the results file."""

from __future__ import annotations

import json

import pytest
from bench_scripts import load_bench_script

from tuneforge.select.algorithms.minhash import normalise_text

TINY_ARGS = ["--model", "tiny", "--size", "4", "--epochs", "1", "--eval-examples", "1", "--device", "cpu",
             "--strategies", "perplexity", "--batch-size", "4"]


@pytest.fixture(scope="module")
def bench():
    return load_bench_script("data_selection")


def test_the_mixture_holds_the_stated_noise(bench):
    mixture = bench.build_mixture(size=20, near_duplicates=0.5, wrong_answers=0.25, off_task=0.1, seed=0)
    kinds = [item.kind for item in mixture]
    assert [kinds.count(k) for k in bench.KINDS] == [40, 20, 10, 4]
    clean = {(normalise_text(i.example.messages[0].content), i.example.messages[1].content)
             for i in mixture if i.kind == "clean"}
    clean_questions = {q: a for q, a in clean}
    for item in mixture:
        question, reply = normalise_text(item.example.messages[0].content), item.example.messages[1].content
        if item.kind == "near_duplicate":
            assert (question, reply) in clean and item.example.messages[0].content not in {
                i.example.messages[0].content for i in mixture if i.kind == "clean"}
        if item.kind == "wrong_answer":
            assert clean_questions.get(question, reply + "?") != reply  # never the gold reply
        if item.kind == "off_task":
            assert item.example.answer is None


def test_tiny_run_records_every_row_and_resumes(bench, tmp_path, monkeypatch, one_torch_thread):
    paths = ["--output-dir", str(tmp_path / "docs"), "--work-dir", str(tmp_path / "work")]
    rows = bench.main([*TINY_ARGS, *paths])
    assert [r["row"] for r in rows] == ["full", "random", "perplexity"]
    full = rows[0]
    assert full["kept"] == 8 + 2 + 2 + 2  # 2 tasks x 4 clean, then 0.3 / 0.2 / 0.2 of 8, rounded
    for row in rows:
        assert sum(row["kept_by_kind"].values()) == row["kept"]
        assert 0 <= row["exact_match"] <= 1 and row["train_seconds"] > 0
    assert all(r["kept"] == round(0.3 * full["kept"]) for r in rows[1:])
    report = (tmp_path / "docs" / "data_selection.md").read_text()
    assert "| perplexity | 4 |" in report and "Goals, for the best strategy row" in report
    assert (tmp_path / "docs" / "data_selection.png").exists()

    monkeypatch.setattr(bench, "measure_row", lambda *a: pytest.fail("a finished row was measured again"))
    again = bench.main([*TINY_ARGS, *paths])
    assert again == rows
    lines = (tmp_path / "docs" / "data_selection.jsonl").read_text().splitlines()
    assert len(lines) == 3 and all(json.loads(line)["key"] for line in lines)
