"""bench/loftq_init.py on a tiny saved Llama: the rows it reports, checked against independent computations."""

from __future__ import annotations

import json

import pytest
from bench_scripts import load_bench_script
from tiny_models import save_tiny_chat_model, tiny_chat_model_and_tokenizer

from tuneforge.quant import quantize_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def bench():
    return load_bench_script("loftq_init")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny-llama")
    save_tiny_chat_model(directory)
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
