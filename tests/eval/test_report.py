"""Side by side: the base row is the bare model, an adapter row is that adapter merged in."""

from __future__ import annotations

import pytest
from eval_helpers import make_model, qa_example, save_perturbed_adapter
from rich.console import Console
from tiny_models import build_tiny_tokenizer

from tuneforge.adapters import LoraConfig, adapter_names, add_adapter, load_adapter, merge_and_unload
from tuneforge.data import Example
from tuneforge.errors import ConfigError, DataError
from tuneforge.eval import evaluate_models, render_table, to_markdown

OPTIONS = dict(max_new_tokens=6, batch_size=4, progress=False, num_samples=10)


@pytest.fixture
def two_adapters(tmp_path, chat_tokenizer):
    first = save_perturbed_adapter(chat_tokenizer, tmp_path / "first", seed=3, target_modules=["q_proj", "v_proj"])
    second = save_perturbed_adapter(chat_tokenizer, tmp_path / "second", seed=4, target_modules=["o_proj", "down_proj"])
    return first, second


def _alone(model, tokenizer, examples) -> dict:
    """The one row of a model evaluated with no adapter machinery involved."""
    [row] = evaluate_models(model, tokenizer, {"alone": None}, examples, **OPTIONS)
    return row


def _predictions(row: dict) -> list[str]:
    return [sample["prediction"] for sample in row["samples"]]


def test_base_and_adapter_rows_match_independent_models(chat_tokenizer, qa_examples, two_adapters):
    first, second = two_adapters
    model = make_model(chat_tokenizer)
    rows = evaluate_models(model, chat_tokenizer, {"base": None, "first": str(first), "second": str(second)}, qa_examples, **OPTIONS)
    assert [row["name"] for row in rows] == ["base", "first", "second"]
    assert adapter_names(model) == []  # the adapters loaded for the comparison are gone again

    bare = _alone(make_model(chat_tokenizer), chat_tokenizer, qa_examples)
    by_name = {row["name"]: row for row in rows}
    assert by_name["base"]["loss"] == pytest.approx(bare["loss"], abs=1e-6)
    assert _predictions(by_name["base"]) == _predictions(bare)

    for name, directory in [("first", first), ("second", second)]:
        merged_model = make_model(chat_tokenizer)
        load_adapter(merged_model, directory)
        merged = _alone(merge_and_unload(merged_model), chat_tokenizer, qa_examples)
        assert by_name[name]["loss"] == pytest.approx(merged["loss"], abs=1e-5)
        assert _predictions(by_name[name]) == _predictions(merged)
        assert by_name[name]["loss"] != pytest.approx(bare["loss"], abs=1e-3), "the adapter must change the model"

    assert _predictions(by_name["first"]) != _predictions(by_name["base"])
    for row in rows:
        assert row["perplexity"] == pytest.approx(2.718281828 ** row["loss"], rel=1e-6)
        assert 0.0 <= row["exact_match"] <= row["contains"] <= 1.0
        assert row["n"] == len(qa_examples)


def test_same_directory_twice_and_existing_adapters_are_left_alone(chat_tokenizer, qa_examples, two_adapters):
    first, _ = two_adapters
    model = make_model(chat_tokenizer)
    add_adapter(model, LoraConfig(r=2, target_modules=["k_proj"]), "mine")
    rows = evaluate_models(model, chat_tokenizer, {"a": first, "b": first}, qa_examples[:2], metrics=("loss",), **OPTIONS)
    assert rows[0]["loss"] == rows[1]["loss"]
    assert adapter_names(model) == ["mine"]
    assert set(rows[0]) == {"name", "adapter", "n", "loss", "perplexity"}


def test_generation_metrics_need_conversations_before_anything_is_loaded(chat_model, chat_tokenizer, tmp_path):
    examples = [Example(text="Hi there")]
    with pytest.raises(DataError, match="final assistant turn"):
        evaluate_models(chat_model, chat_tokenizer, {"ghost": tmp_path / "missing"}, examples, **OPTIONS)
    rows = evaluate_models(chat_model, chat_tokenizer, {"base": None}, examples, metrics=["loss"], **OPTIONS)
    assert rows[0]["loss"] > 0


@pytest.mark.parametrize("metrics", [(), ("accuracy",), ("loss", "bleu")])
def test_unknown_metrics_are_config_errors(chat_model, chat_tokenizer, qa_examples, metrics):
    with pytest.raises(ConfigError, match="metrics"):
        evaluate_models(chat_model, chat_tokenizer, {"base": None}, qa_examples, metrics=metrics)


RESULTS = [
    {"name": "base", "adapter": None, "n": 10, "loss": 2.5, "perplexity": 12.18, "exact_match": 0.1, "contains": 0.3},
    {"name": "tuned|v2", "adapter": "runs/a", "n": 10, "loss": 0.5, "perplexity": 1.65, "exact_match": 0.8, "contains": 0.9},
]


def test_markdown_table_marks_the_best_values():
    lines = to_markdown(RESULTS).splitlines()
    assert lines[0] == "| model | n | loss | perplexity | exact match | contains |"
    assert lines[2] == "| base | 10 | 2.5000 | 12.1800 | 10.0% | 30.0% |"
    assert lines[3] == "| tuned\\|v2 | 10 | **0.5000** | **1.6500** | **80.0%** | **90.0%** |"


def test_rich_table_shows_only_the_metrics_present():
    table = render_table([{"name": "[base]", "n": 3, "loss": 1.0, "perplexity": 2.72}])
    assert [column.header for column in table.columns] == ["model", "n", "loss", "perplexity"]
    console = Console(width=120, record=True)
    console.print(table)
    text = console.export_text()
    assert "[base]" in text and "1.0000" in text and "2.7200" in text


def test_missing_chat_template_is_warned_about_once(caplog, qa_examples):
    tokenizer = build_tiny_tokenizer()  # no chat template: 'auto' falls back to chatml, with a warning
    model = make_model(tokenizer)
    with caplog.at_level("WARNING"):
        evaluate_models(model, tokenizer, {"base": None, "again": None}, qa_examples[:2], **OPTIONS)
    assert sum("no chat template" in record.getMessage() for record in caplog.records) == 1
