"""bench/loftq_init.py on a tiny saved Llama: the rows it reports, checked against independent computations."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
from tiny_models import tiny_chat_model_and_tokenizer

from tuneforge.quant import quantize_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")

BENCH_SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "loftq_init.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("loftq_init_bench", BENCH_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    model, tokenizer = tiny_chat_model_and_tokenizer()
    directory = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def test_loftq_starts_closer_to_the_float_weights_and_qlora_equals_the_quantized_base(bench, tiny_dir, tmp_path, capsys):
    output = tmp_path / "loftq.json"
    results = bench.main(["--model", str(tiny_dir), "--iters", "1", "3", "--examples", "4", "--json", str(output)])
    plain, one, three = results["rows"]
    assert one["weight_error"] < plain["weight_error"] and three["weight_error"] <= one["weight_error"] * 1.001
    assert plain["adapted_layers"] == 2 * 7  # all seven Linear kinds in both decoder layers, not lm_head

    # Plain QLoRA's start is the quantized base itself (B = 0): its loss is that model's loss.
    float_model, tokenizer = tiny_chat_model_and_tokenizer()
    batches = bench.held_out_batches(tokenizer, 4, 8)
    quantized = quantize_model(float_model, **bench.QUANTIZATION).eval()
    assert plain["initial_loss"] == pytest.approx(bench.initial_loss(quantized, batches), abs=1e-6)

    assert json.loads(output.read_text())["rows"][0]["start"] == "plain QLoRA (B = 0)"
    table = capsys.readouterr().out
    assert "| LoftQ, 3 iters |" in table and "| float base (no quantization) | 0 |" in table
