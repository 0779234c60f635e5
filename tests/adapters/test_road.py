"""RoAd: pairwise rotations against explicit 2×2 blocks, merging W and b, and files both ways with peft."""

from __future__ import annotations

import copy
import math

import peft
import pytest
import torch
from tiny_models import perturb_trainable, sample_ids, tiny_gpt2, tiny_llama

from tuneforge.adapters import add_adapter, load_adapter, merge_adapters, save_adapter, unmerge_adapters
from tuneforge.adapters.sharing.road import RoadConfig, RoadLinear
from tuneforge.errors import AdapterError, ConfigError

INTEROP = [
    ("road_1", dict(variant="road_1", group_size=8, target_modules=["q_proj", "down_proj"])),
    ("road_2", dict(variant="road_2", group_size=16, target_modules=["k_proj", "up_proj"])),
    ("road_4", dict(variant="road_4", group_size=4, target_modules=["o_proj", "v_proj"])),
]


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def naive_rotation(adapter: RoadLinear, out_features: int) -> torch.Tensor:
    """R built pair by pair from the paper's 2×2 blocks, reading the parameters in PEFT's layout."""
    g, half = adapter.group_size, adapter.group_size // 2
    theta, alpha = adapter.road_theta.detach(), adapter.road_alpha.detach()
    rotation = torch.zeros(out_features, out_features)
    for group in range(out_features // g):
        for k in range(half):
            i, j = group * g + k, group * g + half + k
            if adapter.variant == "road_1":
                p = group * half + k
                c_i = c_j = alpha[p] * math.cos(theta[p])
                s_i = s_j = alpha[p] * math.sin(theta[p])
            elif adapter.variant == "road_2":
                c_i, s_i = alpha[i] * math.cos(theta[i]), alpha[i] * math.sin(theta[i])
                c_j, s_j = alpha[j] * math.cos(theta[j]), alpha[j] * math.sin(theta[j])
            else:  # road_4: per group [g values for the cosine side | g values for the sine side]
                base = 2 * g * group
                c_i = alpha[base + k] * math.cos(theta[base + k])
                c_j = alpha[base + half + k] * math.cos(theta[base + half + k])
                s_i, s_j = (alpha[base + g + k] * math.sin(theta[base + g + k]),
                            alpha[base + g + half + k] * math.sin(theta[base + g + half + k]))
            rotation[i, i], rotation[i, j] = c_i, -s_i
            rotation[j, j], rotation[j, i] = c_j, s_j
    return rotation


@pytest.mark.parametrize("variant", ["road_1", "road_2", "road_4"])
def test_output_is_the_block_rotation_of_the_base_output(variant):
    model = tiny_llama()
    add_adapter(model, RoadConfig(variant=variant, group_size=8, init_weights=False, target_modules=["up_proj"]))
    layer = model.model.layers[0].mlp.up_proj
    adapter = layer.adapters["default"]
    rotation = naive_rotation(adapter, 64)
    torch.testing.assert_close(adapter.rotation_matrix().detach(), rotation, atol=1e-6, rtol=0)
    x = torch.randn(3, 32)
    torch.testing.assert_close(layer(x), layer.base_layer(x) @ rotation.T, atol=1e-5, rtol=0)


def test_road_1_blocks_are_scaled_rotations():
    model = tiny_llama()
    add_adapter(model, RoadConfig(group_size=8, init_weights=False, target_modules=["q_proj"]))
    adapter = model.model.layers[0].self_attn.q_proj.adapters["default"]
    rotation = adapter.rotation_matrix().detach()
    # RᵀR = diag(α²) with each pair's α on both of its elements
    alpha = adapter.road_alpha.detach().reshape(-1, 1, 4).expand(-1, 2, 4).reshape(-1)
    torch.testing.assert_close(rotation.T @ rotation, torch.diag(alpha**2), atol=1e-5, rtol=0)
    assert abs(torch.linalg.det(rotation) - torch.prod(alpha**2) ** 0.5) < 1e-3 * float(torch.prod(alpha**2) ** 0.5)


def test_merge_rotates_weight_and_bias_and_unmerge_restores_them():
    base = tiny_gpt2()
    model = copy.deepcopy(base)
    add_adapter(model, RoadConfig(variant="road_2", group_size=4, target_modules=["c_fc"]))
    perturb_trainable(model, scale=0.3)
    layer = model.transformer.h[1].mlp.c_fc
    weight, bias = layer.base_layer.weight.detach().clone(), layer.base_layer.bias.detach().clone()
    rotation = layer.adapters["default"].rotation_matrix().detach()
    merge_adapters(model)
    torch.testing.assert_close(layer.base_layer.weight.detach(), weight @ rotation.T, atol=1e-6, rtol=0)  # (in, out)
    torch.testing.assert_close(layer.base_layer.bias.detach(), rotation @ bias, atol=1e-6, rtol=0)
    unmerge_adapters(model)
    torch.testing.assert_close(layer.base_layer.weight.detach(), weight, atol=1e-6, rtol=0)
    torch.testing.assert_close(layer.base_layer.bias.detach(), bias, atol=1e-6, rtol=0)


def test_parameters_per_variant():
    for variant, per_layer in [("road_1", 32), ("road_2", 64), ("road_4", 128)]:
        model = tiny_llama()
        add_adapter(model, RoadConfig(variant=variant, group_size=8, target_modules=["up_proj"]))  # out 64
        adapter = model.model.layers[0].mlp.up_proj.adapters["default"]
        assert adapter.road_theta.numel() == adapter.road_alpha.numel() == per_layer


@pytest.mark.parametrize("case_id,kwargs", INTEROP, ids=[c[0] for c in INTEROP])
def test_tuneforge_road_loads_in_peft(case_id, kwargs, tmp_path):
    base = tiny_llama()
    model = copy.deepcopy(base)
    add_adapter(model, RoadConfig(**kwargs))
    perturb_trainable(model, scale=0.3)
    ids = sample_ids()
    save_adapter(model, tmp_path)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    diff = (logits(theirs, ids) - logits(model, ids)).abs().max().item()
    assert diff <= 1e-5, f"peft's logits differ by {diff}"


@pytest.mark.parametrize("case_id,kwargs", INTEROP, ids=[c[0] for c in INTEROP])
def test_peft_road_loads_in_tuneforge(case_id, kwargs, tmp_path):
    base = tiny_llama()
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.RoadConfig(**kwargs, init_weights=False)).eval()
    ids = sample_ids()
    expected = logits(theirs, ids)
    theirs.save_pretrained(tmp_path)
    model = copy.deepcopy(base)
    load_adapter(model, tmp_path)
    diff = (logits(model, ids) - expected).abs().max().item()
    assert diff <= 1e-5, f"tuneforge's logits differ from peft's by {diff}"


def test_group_size_must_divide_out_features():
    with pytest.raises(AdapterError, match=r"group_size=64 does not divide out_features=16 of "
                                           r"'model.layers.0.self_attn.k_proj'.*e.g. 16"):
        add_adapter(tiny_llama(), RoadConfig(target_modules=["k_proj"]))


def test_layer_with_odd_out_features_is_refused():
    model = torch.nn.Sequential(torch.nn.Linear(4, 5))
    with pytest.raises(AdapterError, match=r"out_features=5 of '0'.*odd.*exclude_modules"):
        add_adapter(model, RoadConfig(group_size=2, target_modules=["0"]))


def test_odd_group_size_is_a_config_error():
    from tuneforge.adapters.config import validate_config

    with pytest.raises(ConfigError, match="group_size=5 must be even"):
        validate_config(RoadConfig, {"group_size": 5}, "adapter.yaml")


def test_safe_merge_refuses_nan_and_leaves_weight_and_bias_untouched():
    model = tiny_gpt2()
    add_adapter(model, RoadConfig(variant="road_2", group_size=4, target_modules=["c_attn"]))
    layer = model.transformer.h[0].attn.c_attn
    weight, bias = layer.base_layer.weight.detach().clone(), layer.base_layer.bias.detach().clone()
    with torch.no_grad():
        layer.adapters["default"].road_theta[5] = float("nan")
    with pytest.raises(AdapterError, match="safe merge refused"):
        merge_adapters(model, safe=True)
    assert torch.equal(layer.base_layer.weight, weight) and torch.equal(layer.base_layer.bias, bias)
