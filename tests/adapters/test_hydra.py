"""Hydra: parallel plus sequential low-rank branches against the naive formula (the sequential branch
sees the pretrained output with its bias, as in the official code), merged and stacked."""

from __future__ import annotations

import copy

import torch
from tiny_models import perturb_trainable, sample_ids, tiny_gpt2, tiny_llama

from tuneforge.adapters import add_adapter, merge_adapters, set_active_adapters, unmerge_adapters
from tuneforge.adapters.rank.hydra import HydraConfig
from tuneforge.adapters.model import wrapped_layers


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def naive_output(x, weight_out_in, bias, adapter):
    """W x + b + s B_p A_p x + s B_s A_s (W x + b), term by term."""
    s = adapter.scaling
    pretrained = x @ weight_out_in.T + (0 if bias is None else bias)
    parallel = (x @ adapter.lora_A.T) @ adapter.lora_B.T
    sequential = (pretrained @ adapter.seq_A.T) @ adapter.seq_B.T
    return pretrained + s * parallel + s * sequential


def with_random_biases(model):
    """GPT-2 initialises its biases to zero, which would hide how the bias is treated."""
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".bias"):
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
    return model


def test_layer_output_matches_the_formula_on_linear_and_conv1d():
    for make_model, targets, transposed in ((tiny_llama, ["q_proj"], False), (tiny_gpt2, ["c_attn"], True)):
        model = with_random_biases(make_model())
        add_adapter(model, HydraConfig(r=4, alpha=8, target_modules=targets))
        perturb_trainable(model, scale=0.3)
        name, layer = next(iter(wrapped_layers(model)))
        base = layer.base_layer
        weight = base.weight.T if transposed else base.weight
        x = torch.randn(2, 5, weight.shape[1])
        with torch.no_grad():
            expected = naive_output(x, weight, getattr(base, "bias", None), layer.adapters["default"])
            torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)
            delta = layer.adapters["default"].delta_weight(base)
            delta = delta.T if transposed else delta
            adapter = layer.adapters["default"]
            identity = torch.eye(weight.shape[0])
            naive_merged = (identity + adapter.scaling * adapter.seq_B @ adapter.seq_A) @ weight \
                + adapter.scaling * adapter.lora_B @ adapter.lora_A
            torch.testing.assert_close(weight + delta, naive_merged, atol=1e-6, rtol=1e-5)


def test_stacked_hydra_adapters_merge_and_unmerge_in_order():
    base = tiny_gpt2()
    model = copy.deepcopy(base)
    for index, name in enumerate(["first", "second"]):
        add_adapter(model, HydraConfig(r=4, target_modules=["c_attn", "c_fc"]), name)
        perturb_trainable(model, scale=0.05, seed=index)
    set_active_adapters(model, ["first", "second"])
    ids = sample_ids()
    expected = logits(model, ids)
    merge_adapters(model)
    torch.testing.assert_close(logits(model, ids), expected, atol=1e-5, rtol=1e-4)
    unmerge_adapters(model)
    torch.testing.assert_close(logits(model, ids), expected, atol=1e-5, rtol=1e-4)
    for (name, layer) in wrapped_layers(model):
        original = base.get_submodule(name).weight
        torch.testing.assert_close(layer.base_layer.weight, original, atol=1e-5, rtol=0)


def test_merging_into_a_layer_with_bias_changes_the_bias_and_unmerge_restores_it():
    base = with_random_biases(tiny_gpt2())
    model = copy.deepcopy(base)
    add_adapter(model, HydraConfig(r=4, target_modules=["c_fc"]))
    perturb_trainable(model, scale=0.2)
    layer = model.transformer.h[0].mlp.c_fc
    adapter, original_bias = layer.adapters["default"], base.transformer.h[0].mlp.c_fc.bias
    assert original_bias.abs().max() > 0, "the check needs a non-zero bias"
    ids = sample_ids()
    expected = logits(model, ids)
    merge_adapters(model, safe=True)
    with torch.no_grad():
        sequential_on_bias = adapter.scaling * adapter.seq_B @ (adapter.seq_A @ original_bias)
    torch.testing.assert_close(layer.base_layer.bias, original_bias + sequential_on_bias, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(logits(model, ids), expected, atol=1e-5, rtol=1e-4)
    unmerge_adapters(model)
    torch.testing.assert_close(layer.base_layer.bias, original_bias, atol=1e-6, rtol=0)
    torch.testing.assert_close(logits(model, ids), expected, atol=1e-5, rtol=1e-4)
