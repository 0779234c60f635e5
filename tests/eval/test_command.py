"""`tuneforge eval` end to end on a tiny model (load_model monkeypatched), through its own parser."""

from __future__ import annotations

import argparse
import json

import pytest
from eval_helpers import save_perturbed_adapter

from tuneforge.errors import ConfigError, DataError
from tuneforge.eval import command
from tuneforge.eval.command import add_eval_arguments, parse_adapter_spec, run_eval


def _parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="tuneforge eval")
    add_eval_arguments(parser)
    return parser.parse_args(list(argv))


@pytest.fixture
def patched_load(monkeypatch, fake_load_model):
    monkeypatch.setattr(command, "load_model", fake_load_model)
    return fake_load_model


def test_run_eval_writes_the_comparison_as_json(tmp_path, chat_tokenizer, patched_load, capsys):
    adapter = save_perturbed_adapter(chat_tokenizer, tmp_path / "runs" / "arith", seed=5, target_modules=["q_proj", "v_proj"])
    output = tmp_path / "out" / "results.json"
    args = _parse("--adapter", str(adapter), "--adapter", f"again={adapter}", "--limit", "4", "--max-new-tokens", "4",
                  "--batch-size", "3", "--device", "cpu", "--output", str(output))

    assert run_eval(args) == 0

    assert patched_load.calls == [("smollm2-135m", "auto", "cpu")]
    record = json.loads(output.read_text())
    assert record["data"] == "arithmetic" and record["split"] == "eval"
    assert record["metrics"] == ["loss", "exact_match", "contains"]
    rows = record["results"]
    assert [(row["name"], row["adapter"]) for row in rows] == [("base", None), ("arith", str(adapter)), ("again", str(adapter))]
    for row in rows:
        assert row["n"] == 4
        assert row["loss"] > 0 and row["perplexity"] > 1
        assert 0 <= row["exact_match"] <= row["contains"] <= 1
        assert len(row["samples"]) == 3 and "How many" in row["samples"][0]["question"]
    assert rows[1]["loss"] == rows[2]["loss"] != rows[0]["loss"]
    shown = capsys.readouterr().out
    assert "exact match" in shown and "sample predictions" in shown and "results written" in shown


def test_plain_text_data_defaults_to_loss_only(tmp_path, patched_load, capsys):
    data = tmp_path / "text.jsonl"
    data.write_text(json.dumps({"text": "Hello there, how are you today?"}) + "\n")
    output = tmp_path / "results.json"
    assert run_eval(_parse("--data", str(data), "--output", str(output))) == 0
    [row] = json.loads(output.read_text())["results"]
    assert row["name"] == "base" and "loss" in row and "exact_match" not in row
    assert "plain text" in capsys.readouterr().out

    with pytest.raises(DataError, match="final assistant turn.*plain text"):
        run_eval(_parse("--data", str(data), "--metrics", "loss,exact_match"))
    assert len(patched_load.calls) == 1, "the model is not loaded for a run that cannot succeed"


@pytest.mark.parametrize("argv, message", [
    (["--no-base"], "--no-base"),
    (["--adapter", "does/not/exist"], "does not exist"),
    (["--adapter", "."], "holds no adapter_config.json"),
    (["--metrics", "loss,bleu"], "bleu"),
    (["--limit", "-1"], "--limit"),
    (["--batch-size", "0"], "--batch-size"),
])
def test_bad_arguments_fail_before_the_model_loads(argv, message, patched_load):
    with pytest.raises(ConfigError, match=message):
        run_eval(_parse(*argv))
    assert patched_load.calls == []


def test_adapter_names_come_from_name_equals_or_the_folder(tmp_path):
    assert parse_adapter_spec("tuned=runs/a/adapter") == ("tuned", "runs/a/adapter")
    assert parse_adapter_spec("runs/arith/adapter") == ("arith", "runs/arith/adapter")
    assert parse_adapter_spec("runs/arith/checkpoints/step-20/adapter") == ("step-20", "runs/arith/checkpoints/step-20/adapter")
    assert parse_adapter_spec("exported/lora-v2") == ("lora-v2", "exported/lora-v2")
    odd = tmp_path / "x=y"
    odd.mkdir()
    assert parse_adapter_spec(str(odd)) == ("x=y", str(odd))


def test_a_run_folder_stands_for_its_adapter_and_names_must_differ(tmp_path, chat_tokenizer):
    run = tmp_path / "arith"
    save_perturbed_adapter(chat_tokenizer, run / "adapter", seed=6, target_modules=["q_proj"])
    assert command.build_variants([str(run)], include_base=False) == {"arith": str(run / "adapter")}
    with pytest.raises(ConfigError, match="already used"):
        command.build_variants([str(run), f"arith={run}"], include_base=True)


def test_quantize_flag_evaluates_an_adapter_on_the_quantized_base(tmp_path, chat_tokenizer, patched_load):
    adapter = save_perturbed_adapter(chat_tokenizer, tmp_path / "qa", seed=5, target_modules=["q_proj", "v_proj"])
    output = tmp_path / "results.json"
    args = _parse("--adapter", str(adapter), "--limit", "3", "--max-new-tokens", "2", "--quantize", "nf4",
                  "--device", "cpu", "--output", str(output))
    assert run_eval(args) == 0
    assert patched_load.quantized["bits"] == 4 and patched_load.quantized["quant_type"] == "nf4"
    rows = json.loads(output.read_text())["results"]
    assert rows[0]["loss"] != rows[1]["loss"]  # the adapter ran on top of the QuantLinear layers
