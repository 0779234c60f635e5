"""BitFit: out + Δb, compact files, merging into existing biases, bias-free layers refused unless
add_missing_biases, and the no-bias merge policy."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import perturb_trainable, sample_ids, tiny_gpt2, tiny_llama

from tuneforge.adapters import add_adapter, merge_adapters, save_adapter, unmerge_adapters
from tuneforge.adapters.selective.bitfit import BitFitConfig
from tuneforge.errors import AdapterError


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_output_is_base_plus_bias_delta():
    model = tiny_llama()
    add_adapter(model, BitFitConfig(target_modules=["q_proj"], add_missing_biases=True))
    perturb_trainable(model)
    q_proj = model.model.layers[0].self_attn.q_proj
    x = torch.randn(4, 32)
    with torch.no_grad():
        expected = x @ q_proj.base_layer.weight.T + q_proj.adapters["default"].bias_delta
        torch.testing.assert_close(q_proj(x), expected)


def test_file_holds_only_the_delta_vectors(tmp_path):
    model = tiny_gpt2()
    add_adapter(model, BitFitConfig(target_modules=["c_attn"]))
    save_adapter(model, tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    assert sorted(tensors) == [f"base_model.model.transformer.h.{i}.attn.c_attn.bias_delta" for i in range(2)]
    assert all(t.shape == (96,) for t in tensors.values())


def test_merge_adds_to_the_existing_bias_and_unmerge_restores():
    model = tiny_gpt2()
    original = copy.deepcopy(model)
    add_adapter(model, BitFitConfig(target_modules=["c_fc"]))
    perturb_trainable(model)
    layer = model.transformer.h[1].mlp.c_fc
    merge_adapters(model)
    expected = original.transformer.h[1].mlp.c_fc.bias + layer.adapters["default"].bias_delta
    torch.testing.assert_close(layer.base_layer.bias, expected)
    unmerge_adapters(model)
    torch.testing.assert_close(layer.base_layer.bias, original.transformer.h[1].mlp.c_fc.bias)


def test_merge_into_a_layer_without_bias_refuses_and_leaves_the_base_alone():
    model = tiny_llama()
    add_adapter(model, BitFitConfig(target_modules=["v_proj"], add_missing_biases=True))
    perturb_trainable(model)
    with pytest.raises(AdapterError, match="has no bias.*merge_adds_bias: true"):
        merge_adapters(model)
    assert model.model.layers[0].self_attn.v_proj.base_layer.bias is None


def test_merge_adds_bias_when_allowed_and_unmerge_removes_it():
    model = tiny_llama()
    add_adapter(model, BitFitConfig(target_modules=["v_proj"], add_missing_biases=True, merge_adds_bias=True))
    perturb_trainable(model)
    ids = sample_ids()
    expected = logits(model, ids)
    merge_adapters(model)
    layer = model.model.layers[0].self_attn.v_proj
    torch.testing.assert_close(layer.base_layer.bias, layer.adapters["default"].bias_delta.detach())
    torch.testing.assert_close(logits(model, ids), expected, atol=1e-5, rtol=1e-4)
    unmerge_adapters(model)
    assert layer.base_layer.bias is None
    torch.testing.assert_close(logits(model, ids), expected, atol=1e-5, rtol=1e-4)


def test_default_trains_existing_biases_only_and_refuses_bias_free_layers():
    with pytest.raises(AdapterError, match=r"'model\.layers\.0\.self_attn\.q_proj' \(Linear\) has no bias.*"
                                           r"add_missing_biases: true"):
        add_adapter(tiny_llama(), BitFitConfig())
    model = tiny_gpt2()
    wrapped = add_adapter(model, BitFitConfig())
    assert wrapped and all(model.get_submodule(name).base_layer.bias is not None for name in wrapped)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == sum(model.get_submodule(name).base_layer.bias.numel() for name in wrapped)


def test_registry_description_says_what_happens_without_biases():
    from tuneforge.adapters.registry import get_method

    assert "add_missing_biases" in get_method("bitfit").description
