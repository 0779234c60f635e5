"""IA3: the scaling math against a naive formula, bias handling on merge, and peft interop both ways."""

from __future__ import annotations

import copy

import peft
import pytest
import torch
from tiny_models import perturb_trainable, sample_ids, tiny_gpt2, tiny_llama

from tuneforge.adapters import add_adapter, load_adapter, merge_adapters, save_adapter, unmerge_adapters
from tuneforge.adapters.selective.ia3 import IA3Config
from tuneforge.errors import ConfigError


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_output_and_input_scaling_match_the_naive_formula():
    model = tiny_llama()
    add_adapter(model, IA3Config())
    perturb_trainable(model, scale=0.3)
    attn = model.model.layers[0].self_attn
    mlp = model.model.layers[0].mlp
    x = torch.randn(3, 32)
    h = torch.randn(3, 64)
    k_scale = attn.k_proj.adapters["default"].ia3_l  # (out, 1)
    ff_scale = mlp.down_proj.adapters["default"].ia3_l  # (1, in)
    assert k_scale.shape == (16, 1) and ff_scale.shape == (1, 64)
    with torch.no_grad():
        expected_k = (x @ attn.k_proj.base_layer.weight.T) * k_scale.flatten()
        expected_ff = (h * ff_scale.flatten()) @ mlp.down_proj.base_layer.weight.T
        torch.testing.assert_close(attn.k_proj(x), expected_k)
        torch.testing.assert_close(mlp.down_proj(h), expected_ff)


def test_merged_weights_are_rows_and_columns_scaled():
    model = tiny_llama()
    original = copy.deepcopy(model)
    add_adapter(model, IA3Config())
    perturb_trainable(model, scale=0.3)
    merge_adapters(model)
    layer = model.model.layers[1]
    v_scale = layer.self_attn.v_proj.adapters["default"].ia3_l.detach()
    ff_scale = layer.mlp.down_proj.adapters["default"].ia3_l.detach()
    base = original.model.layers[1]
    torch.testing.assert_close(layer.self_attn.v_proj.base_layer.weight, base.self_attn.v_proj.weight * v_scale)
    torch.testing.assert_close(layer.mlp.down_proj.base_layer.weight, base.mlp.down_proj.weight * ff_scale)
    unmerge_adapters(model)
    torch.testing.assert_close(layer.mlp.down_proj.base_layer.weight, base.mlp.down_proj.weight)


def test_merge_scales_the_bias_on_the_output_side_only():
    """(W x + b)·l scales b; W (x·l) + b leaves b alone (GPT-2's Conv1D layers have biases)."""
    model = tiny_gpt2()
    original = copy.deepcopy(model)
    add_adapter(model, IA3Config(target_modules=["c_attn", "mlp.c_proj"], feedforward_modules=["mlp.c_proj"]))
    perturb_trainable(model, scale=0.3)
    ids = sample_ids()
    expected = logits(model, ids)
    merge_adapters(model)
    block, base_block = model.transformer.h[0], original.transformer.h[0]
    attn_scale = block.attn.c_attn.adapters["default"].ia3_l.detach().flatten()
    ff_scale = block.mlp.c_proj.adapters["default"].ia3_l.detach().flatten()
    torch.testing.assert_close(block.attn.c_attn.base_layer.bias, base_block.attn.c_attn.bias * attn_scale)
    torch.testing.assert_close(block.attn.c_attn.base_layer.weight, base_block.attn.c_attn.weight * attn_scale)
    torch.testing.assert_close(block.mlp.c_proj.base_layer.bias, base_block.mlp.c_proj.bias)  # untouched
    torch.testing.assert_close(block.mlp.c_proj.base_layer.weight, base_block.mlp.c_proj.weight * ff_scale[:, None])
    torch.testing.assert_close(logits(model, ids), expected, atol=1e-5, rtol=1e-4)


def test_feedforward_module_outside_targets_is_rejected():
    with pytest.raises(ConfigError, match="feedforward_modules"):
        from tuneforge.adapters.config import validate_config

        validate_config(IA3Config, {"target_modules": ["k_proj"], "feedforward_modules": ["down_proj"]}, "test.yaml")


INTEROP = [
    ("llama", tiny_llama, dict(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"])),
    ("gpt2-conv1d", tiny_gpt2, dict(target_modules=["c_attn", "mlp.c_proj"], feedforward_modules=["mlp.c_proj"])),
]


@pytest.mark.parametrize("case_id,make_model,kwargs", INTEROP, ids=[c[0] for c in INTEROP])
def test_tuneforge_ia3_loads_in_peft(case_id, make_model, kwargs, tmp_path):
    base = make_model()
    model = copy.deepcopy(base)
    add_adapter(model, IA3Config(**kwargs))
    perturb_trainable(model, scale=0.2)
    save_adapter(model, tmp_path)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    ids = sample_ids()
    diff = (logits(theirs, ids) - logits(model, ids)).abs().max().item()
    assert diff <= 1e-5, f"peft's logits differ by {diff}"
    assert (logits(model, ids) - logits(base, ids)).abs().max() > 1e-3


@pytest.mark.parametrize("case_id,make_model,kwargs", INTEROP, ids=[c[0] for c in INTEROP])
def test_peft_ia3_loads_in_tuneforge(case_id, make_model, kwargs, tmp_path):
    base = make_model()
    fan_in_fan_out = case_id.startswith("gpt2")
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.IA3Config(**kwargs, fan_in_fan_out=fan_in_fan_out))
    perturb_trainable(theirs, scale=0.2)
    theirs.eval()
    ids = sample_ids()
    expected = logits(theirs, ids)
    theirs.save_pretrained(tmp_path)
    model = copy.deepcopy(base)
    load_adapter(model, tmp_path)
    diff = (logits(model, ids) - expected).abs().max().item()
    assert diff <= 1e-5, f"tuneforge's logits differ from peft's by {diff}"
