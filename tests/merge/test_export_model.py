"""`tuneforge export` on tiny models: HF and GGUF exports give the adapter model's logits; QLoRA dequantize-merge."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
import yaml
from tiny_models import build_tiny_tokenizer, perturb_trainable, tiny_chat_model_and_tokenizer, tiny_gpt2, tiny_llama
from transformers import AutoModelForCausalLM, AutoTokenizer

from tuneforge.adapters import LoraConfig, add_adapter, load_adapter, save_adapter
from tuneforge.cli import main
from tuneforge.errors import ConfigError, ModelLoadError
from tuneforge.merge.export import REPORT_FILE, compare_logits, export_model
from tuneforge.merge.gguf_writer import interleave_rotary_rows, quantize_q8_0

PROMPTS = ("Tom has 3 apples and buys 4 more.", "Which box holds the key? box 2", "<|im_start|>user\nHello")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    model, tokenizer = tiny_chat_model_and_tokenizer()
    model.save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    add_adapter(model, LoraConfig(r=4, target_modules="all-linear"))
    perturb_trainable(model, scale=0.1)
    save_adapter(model, root / "adapter")
    return root


def adapter_logits(root, batch):
    model = AutoModelForCausalLM.from_pretrained(root / "base", dtype=torch.float32).eval()
    load_adapter(model, root / "adapter")
    with torch.no_grad():
        return model(**batch).logits


def batch_for(tokenizer):
    return dict(tokenizer(list(PROMPTS), return_tensors="pt", padding=True))


def test_hf_export_in_float32_matches_the_adapter_model(saved, tmp_path):
    report = export_model(str(saved / "base"), saved / "adapter", tmp_path / "out", dtype="f32", prompts=PROMPTS)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "out")
    assert tokenizer.chat_template and "im_start" in tokenizer.chat_template
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    batch = batch_for(tokenizer)
    with torch.no_grad():
        torch.testing.assert_close(exported(**batch).logits, adapter_logits(saved, batch), atol=1e-5, rtol=1e-5)
    assert report.difference.max_abs_logit_diff < 1e-5
    written = json.loads((tmp_path / "out" / REPORT_FILE).read_text())
    assert written["difference"]["max_abs_logit_diff"] == report.difference.max_abs_logit_diff


def test_hf_export_in_bf16_is_sharded_and_close(saved, tmp_path):
    report = export_model(str(saved / "base"), saved / "adapter", tmp_path / "out", dtype="bf16",
                          max_shard_size="20KB", prompts=PROMPTS)
    assert (tmp_path / "out" / "model.safetensors.index.json").is_file()
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert exported.dtype == torch.bfloat16
    assert report.difference.mean_kl < 1e-3  # bf16 rounding of the merged weights, stated tolerance
    assert report.difference.mean_kl > 0  # the check measures the written (rounded) model, not the float one


@pytest.mark.parametrize("gguf_type,max_logit_diff", [("f16", 0.02), ("q8_0", 0.05)])
def test_gguf_export_reads_back_through_transformers(saved, tmp_path, gguf_type, max_logit_diff):
    assert main(["export", "--model", str(saved / "base"), "--adapter", str(saved / "adapter"),
                 "--output", str(tmp_path / "out"), "--format", "gguf", "--gguf-type", gguf_type]) == 0
    name = f"model-{gguf_type}.gguf"
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "out", gguf_file=name, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(saved / "base")
    batch = batch_for(tokenizer)
    with torch.no_grad():
        diff = compare_logits(adapter_logits(saved, batch).reshape(-1, exported.config.vocab_size),
                              exported(**batch).logits.reshape(-1, exported.config.vocab_size))
    assert diff.max_abs_logit_diff < max_logit_diff and diff.mean_kl < 1e-4
    gguf_tokenizer = AutoTokenizer.from_pretrained(tmp_path / "out", gguf_file=name)
    for text in PROMPTS:
        assert gguf_tokenizer(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert gguf_tokenizer.chat_template == tokenizer.chat_template
    assert gguf_tokenizer.eos_token == tokenizer.eos_token


def test_rotary_reorder_is_what_transformers_undoes():
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    weight = torch.randn(3 * 8, 5)  # 3 heads of dim 8
    reordered = interleave_rotary_rows(weight, heads=3)
    assert not torch.equal(reordered, weight)
    undone = LlamaTensorProcessor(config={})._reverse_permute_weights(reordered.numpy(), 3, 3)
    np.testing.assert_array_equal(undone, weight.numpy())


def test_own_q8_0_is_bit_exact_with_gguf_quants():
    from gguf import GGMLQuantizationType, quants

    matrix = np.random.default_rng(0).standard_normal((6, 96)).astype(np.float32)
    matrix[0, :32] = 0.0  # an all-zero block
    np.testing.assert_array_equal(quantize_q8_0(matrix), quants.quantize(matrix, GGMLQuantizationType.Q8_0))


def test_qlora_adapter_is_exported_by_dequantize_merge_within_tolerance(saved, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump({"model": str(saved / "base"), "adapter": {"r": 4},
                                                    "quantization": {"bits": 4, "type": "nf4", "compute_dtype": "float32"}}))
    shutil.copytree(saved / "adapter", run / "adapter")
    report = export_model(str(saved / "base"), run / "adapter", tmp_path / "out", dtype="f32", prompts=PROMPTS)
    assert report.quantized_base["type"] == "nf4" and "dequantize-merge" in report.notes[0]
    # Stated tolerance vs the unmerged adapter on the 4-bit base: the only difference is NF4's rounding of W.
    assert report.difference.mean_kl < 5e-3
    assert report.difference.max_abs_logit_diff > 1e-4  # really compared with the quantized model
    plain = export_model(str(saved / "base"), saved / "adapter", tmp_path / "plain", dtype="f32", prompts=PROMPTS)
    assert plain.difference.max_abs_logit_diff < report.difference.max_abs_logit_diff


def test_an_adapter_copied_out_of_its_run_is_still_known_as_qlora_by_its_record(saved, tmp_path):
    from tuneforge.adapters.peft_format import TRAINING_FILE
    from tuneforge.config.schema import QuantConfig
    from tuneforge.merge.export import find_run_quantization

    run = tmp_path / "run"  # a run config that says otherwise: the adapter's own record wins
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump({"adapter": {"r": 4}, "quantization": None}))
    shutil.copytree(saved / "adapter", run / "adapter")
    recorded = QuantConfig().model_dump(mode="json")  # what `tuneforge train` records: compute_dtype "auto"
    (run / "adapter" / TRAINING_FILE).write_text(json.dumps({"base_quantization": recorded}))
    assert find_run_quantization(run / "adapter") == recorded
    report = export_model(str(saved / "base"), run / "adapter", tmp_path / "out", dtype="f32", prompts=PROMPTS)
    assert report.quantized_base == recorded and "dequantize-merge" in report.notes[0]
    assert report.difference.mean_kl < 5e-3


def test_requantize_writes_a_quantized_model(saved, tmp_path):
    from tuneforge.quant.loading import load_saved_quantized
    from tuneforge.quant.model import quantized_layers

    settings = {"bits": 4, "type": "nf4", "compute_dtype": "float32"}
    report = export_model(str(saved / "base"), saved / "adapter", tmp_path / "out", quantization=settings,
                          requantize=True, prompts=PROMPTS)
    assert quantized_layers(load_saved_quantized(tmp_path / "out"))
    assert report.requantized and report.difference.mean_kl < 5e-2


def test_non_llama_gguf_export_is_refused_clearly(tmp_path):
    model = tiny_gpt2()
    tokenizer = tiny_chat_model_and_tokenizer()[1]
    model.save_pretrained(tmp_path / "gpt2")
    tokenizer.save_pretrained(tmp_path / "gpt2")
    add_adapter(model, LoraConfig(r=2, target_modules=["c_attn"], fan_in_fan_out=True))
    save_adapter(model, tmp_path / "adapter")
    with pytest.raises(ConfigError, match=r"GGUF export supports Llama-architecture models .* 'gpt2'.*--format hf"):
        export_model(str(tmp_path / "gpt2"), tmp_path / "adapter", tmp_path / "out", fmt="gguf")
    assert not (tmp_path / "out").exists()


def test_bad_export_input(saved, tmp_path, capsys):
    out = tmp_path / "exists"
    out.mkdir()
    with pytest.raises(ConfigError, match="already exists"):
        export_model(str(saved / "base"), saved / "adapter", out)
    with pytest.raises(ConfigError, match="has no adapter_config.json"):
        export_model(str(saved / "base"), tmp_path / "nothing", tmp_path / "o1")
    with pytest.raises(ModelLoadError, match="no-such-base"):
        export_model(str(tmp_path / "no-such-base"), saved / "adapter", tmp_path / "o2")
    with pytest.raises(ConfigError, match="--requantize"):
        export_model(str(saved / "base"), saved / "adapter", tmp_path / "o3", requantize=True)
    assert main(["export", "--model", str(saved / "base"), "--adapter", str(saved / "adapter"),
                 "--output", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exists"]


def test_no_verify_skips_the_read_back(saved, tmp_path):
    report = export_model(str(saved / "base"), saved / "adapter", tmp_path / "out", fmt="gguf", verify=False)
    assert report.difference is None and "not verified" in report.lines()[1]
    assert (tmp_path / "out" / "model-f16.gguf").is_file()


def test_gguf_export_of_a_tied_model_leaves_out_the_head(tmp_path):
    from gguf import GGUFReader

    tokenizer = build_tiny_tokenizer()
    model = tiny_llama(vocab_size=len(tokenizer), tie_word_embeddings=True)
    model.save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    add_adapter(model, LoraConfig(r=2, target_modules=["q_proj", "down_proj"]))
    perturb_trainable(model, scale=0.1)
    save_adapter(model, tmp_path / "adapter")
    report = export_model(str(tmp_path / "base"), tmp_path / "adapter", tmp_path / "out", fmt="gguf", prompts=PROMPTS)
    names = {t.name for t in GGUFReader(str(tmp_path / "out" / "model-f16.gguf")).tensors}
    assert "token_embd.weight" in names and "output.weight" not in names
    assert report.difference.mean_kl < 1e-4 and report.difference.max_abs_logit_diff < 0.02
