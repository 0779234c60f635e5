"""LoRA-XS: frozen factors from the SVD of W, r² trainable numbers per layer, files checked against W."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from tiny_models import perturb_trainable, sample_ids, tiny_gpt2, tiny_llama

from tuneforge.adapters import add_adapter, load_adapter, merge_adapters, save_adapter, trainable_parameters
from tuneforge.adapters.sharing.lora_xs import LoraXsConfig
from tuneforge.errors import AdapterError


def test_frozen_factors_are_the_best_rank_r_approximation_of_w():
    model = tiny_llama()
    add_adapter(model, LoraXsConfig(r=3, target_modules=["down_proj"]))
    layer = model.model.layers[0].mlp.down_proj
    weight = layer.base_layer.weight.detach().numpy().astype(np.float64)
    u, s, vt = np.linalg.svd(weight, full_matrices=False)  # an independent SVD
    best = (u[:, :3] * s[:3]) @ vt[:3]
    adapter = layer.adapters["default"]
    np.testing.assert_allclose((adapter.lora_B @ adapter.lora_A).numpy(), best, atol=1e-5)
    torch.testing.assert_close(adapter.lora_A @ adapter.lora_A.T, torch.eye(3), atol=1e-5, rtol=0)


def test_output_matches_the_formula():
    model = tiny_gpt2()
    add_adapter(model, LoraXsConfig(r=4, alpha=2, target_modules=["c_fc"]))
    perturb_trainable(model)
    layer = model.transformer.h[0].mlp.c_fc
    adapter = layer.adapters["default"]
    weight = layer.base_layer.weight.detach().T.clone()  # Conv1D stores (in, out)
    b, a = adapter.lora_B, adapter.lora_A
    x = torch.randn(5, 32)
    expected = layer.base_layer(x) + (2 / 4) * x @ (b @ adapter.lora_xs_R @ a).T
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=0)
    merge_adapters(model)
    torch.testing.assert_close(layer.base_layer.weight.detach().T, weight + (2 / 4) * b @ adapter.lora_xs_R @ a,
                               atol=1e-6, rtol=0)


def test_trains_and_stores_r_squared_per_layer(tmp_path):
    model = tiny_llama()
    add_adapter(model, LoraXsConfig(r=4, target_modules=["q_proj", "v_proj", "up_proj"]))
    assert trainable_parameters(model)[0] == 2 * 3 * 4 * 4
    save_adapter(model, tmp_path)
    stored = load_file(str(tmp_path / "adapter_model.safetensors"))
    cores = {k: v for k, v in stored.items() if k.endswith("lora_xs_R")}
    assert len(cores) == 6 and all(v.shape == (4, 4) for v in cores.values())
    # besides the cores only a (2, r) fingerprint per layer: no copy of the frozen factors
    assert sum(v.numel() for v in stored.values()) == 6 * (16 + 8)


def test_loading_onto_other_base_weights_is_refused(tmp_path):
    model = tiny_llama(seed=0)
    add_adapter(model, LoraXsConfig(r=4, target_modules=["q_proj"]))
    perturb_trainable(model)
    save_adapter(model, tmp_path)
    reloaded = tiny_llama(seed=0)
    load_adapter(reloaded, tmp_path)
    ids = sample_ids()
    torch.testing.assert_close(reloaded(ids).logits, model(ids).logits, atol=1e-6, rtol=0)
    with pytest.raises(AdapterError, match="trained on different base weights"):
        load_adapter(tiny_llama(seed=1), tmp_path)


def test_rank_above_the_layer_size_is_refused():
    with pytest.raises(AdapterError, match=r"r=17 is too large for 'model.layers.0.self_attn.v_proj'.*16x32"):
        add_adapter(tiny_llama(), LoraXsConfig(r=17, target_modules=["v_proj"]))


def test_sign_convention_makes_the_factors_reproducible():
    model = tiny_llama()
    first, second = copy.deepcopy(model), copy.deepcopy(model)
    add_adapter(first, LoraXsConfig(r=4, target_modules=["o_proj"]))
    add_adapter(second, LoraXsConfig(r=4, target_modules=["o_proj"]))
    a1 = first.model.layers[1].self_attn.o_proj.adapters["default"].lora_B
    a2 = second.model.layers[1].self_attn.o_proj.adapters["default"].lora_B
    torch.testing.assert_close(a1, a2, atol=0, rtol=0)
    peaks = a1.abs().argmax(dim=0)
    assert (a1[peaks, torch.arange(4)] > 0).all()


def test_saved_factors_travel_with_the_adapter(tmp_path):
    model = tiny_llama(seed=0)
    add_adapter(model, LoraXsConfig(r=4, save_factors=True, target_modules=["q_proj"]))
    perturb_trainable(model)
    save_adapter(model, tmp_path)
    stored = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert sum(v.numel() for v in stored.values()) == 2 * (16 + 8 + 4 * 32 + 32 * 4)
    other = tiny_llama(seed=1)  # other weights: the stored factors are used, not this model's SVD
    load_adapter(other, tmp_path)
    ours = model.model.layers[1].self_attn.q_proj
    theirs = other.model.layers[1].self_attn.q_proj
    torch.testing.assert_close(theirs.adapters["default"].delta_weight(theirs.base_layer),
                               ours.adapters["default"].delta_weight(ours.base_layer), atol=0, rtol=0)
