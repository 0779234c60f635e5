"""VB-LoRA: composition from the bank against a naive loop, stored sizes, and files both ways with peft."""

from __future__ import annotations

import copy

import peft
import pytest
import torch
from safetensors.torch import load_file
from tiny_models import perturb_trainable, sample_ids, tiny_gpt2, tiny_llama

from tuneforge.adapters import AdaptedLayer, add_adapter, load_adapter, loraplus_param_groups, save_adapter
from tuneforge.adapters.sharing.vb_lora import VbLoraConfig
from tuneforge.errors import AdapterError, ConfigError

INTEROP = [
    ("llama", tiny_llama, dict(r=4, num_vectors=16, vector_length=8, target_modules=["q_proj", "v_proj", "down_proj"])),
    ("llama-topk-only", tiny_llama, dict(r=2, num_vectors=8, vector_length=16, topk=3, save_only_topk_weights=True,
                                         target_modules=["o_proj", "up_proj"])),
    ("gpt2-conv1d", tiny_gpt2, dict(r=4, num_vectors=12, vector_length=8, target_modules=["c_attn", "c_fc"])),
]


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def vb_layers(model):
    return [m.adapters["default"] for m in model.modules() if isinstance(m, AdaptedLayer)]


def naive_factors(logits_a, logits_b, bank, k):
    """Sub-vector by sub-vector: sort the logits, softmax the best k, sum the weighted bank rows."""
    def mix(scores):
        order = sorted(range(len(scores)), key=lambda t: -float(scores[t]))[:k]
        weights = torch.softmax(torch.stack([scores[t] for t in order]), dim=0)
        return sum(w * bank[t] for w, t in zip(weights, order))

    r, in_tiles, _ = logits_a.shape
    out_tiles = logits_b.shape[0]
    length = bank.shape[1]
    lora_a = torch.zeros(r, in_tiles * length)
    lora_b = torch.zeros(out_tiles * length, r)
    for i in range(r):
        for j in range(in_tiles):
            lora_a[i, j * length:(j + 1) * length] = mix(logits_a[i, j])
        for o in range(out_tiles):
            lora_b[o * length:(o + 1) * length, i] = mix(logits_b[o, i])
    return lora_a, lora_b


def test_delta_matches_a_naive_composition_loop():
    model = tiny_llama()
    add_adapter(model, VbLoraConfig(r=3, num_vectors=6, vector_length=16, topk=2, target_modules=["up_proj"]))
    perturb_trainable(model, scale=0.5)
    layer = model.model.layers[1].mlp.up_proj
    adapter = layer.adapters["default"]
    with torch.no_grad():
        lora_a, lora_b = naive_factors(adapter.vblora_logits_A, adapter.vblora_logits_B,
                                       adapter.bank.vblora_vector_bank, 2)
        torch.testing.assert_close(adapter.delta_weight(layer.base_layer), lora_b @ lora_a, atol=1e-6, rtol=0)
        x = torch.randn(4, 32)
        torch.testing.assert_close(layer(x), layer.base_layer(x) + x @ (lora_b @ lora_a).T, atol=1e-6, rtol=0)


def test_one_bank_per_adapter_reported_once_to_the_optimizer():
    model = tiny_llama()
    add_adapter(model, VbLoraConfig(r=2, num_vectors=8, vector_length=8, target_modules=["q_proj", "k_proj"]))
    layers = vb_layers(model)
    assert len({id(layer.bank) for layer in layers}) == 1
    params = [p for group in loraplus_param_groups(model, lr=1e-3) for p in group["params"]]
    assert len(params) == len({id(p) for p in params}) == 2 * len(layers) + 1
    model(sample_ids(), labels=sample_ids()).loss.backward()
    bank = layers[0].bank.vblora_vector_bank
    assert bank.grad is not None and bank.grad.abs().sum() > 0


@pytest.mark.parametrize("topk_only", [False, True])
def test_stored_parameter_count_formula(topk_only, tmp_path):
    model = tiny_llama()
    r, n, length, k = 2, 8, 16, 3
    add_adapter(model, VbLoraConfig(r=r, num_vectors=n, vector_length=length, topk=k, save_only_topk_weights=topk_only,
                                    target_modules=["q_proj", "up_proj"]))
    save_adapter(model, tmp_path)
    stored = load_file(str(tmp_path / "adapter_model.safetensors"))
    # sub-vectors per layer: r·in/L for A plus out/L·r for B; q_proj 32->32, up_proj 32->64; two decoder layers
    sub_vectors = 2 * ((r * 32 // length + 32 // length * r) + (r * 32 // length + 64 // length * r))
    per_sub_vector = (2 * k - 1) if topk_only else n  # k indices + k-1 weights, or all n logits
    assert sum(t.numel() for t in stored.values()) == n * length + sub_vectors * per_sub_vector


@pytest.mark.parametrize("case_id,make_model,kwargs", INTEROP, ids=[c[0] for c in INTEROP])
def test_tuneforge_vb_lora_loads_in_peft(case_id, make_model, kwargs, tmp_path):
    base = make_model()
    model = copy.deepcopy(base)
    add_adapter(model, VbLoraConfig(**kwargs))
    perturb_trainable(model)
    ids = sample_ids()
    save_adapter(model, tmp_path)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    diff = (logits(theirs, ids) - logits(model, ids)).abs().max().item()
    assert diff <= 1e-5, f"peft's logits differ by {diff}"


@pytest.mark.parametrize("case_id,make_model,kwargs", INTEROP, ids=[c[0] for c in INTEROP])
def test_peft_vb_lora_loads_in_tuneforge(case_id, make_model, kwargs, tmp_path):
    base = make_model()
    extra = {"fan_in_fan_out": True} if make_model is tiny_gpt2 else {}
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.VBLoRAConfig(**kwargs, **extra))
    perturb_trainable(theirs)
    theirs.eval()
    ids = sample_ids()
    theirs.save_pretrained(tmp_path)
    expected = logits(theirs, ids)
    model = copy.deepcopy(base)
    load_adapter(model, tmp_path)
    diff = (logits(model, ids) - expected).abs().max().item()
    assert diff <= 1e-5, f"tuneforge's logits differ from peft's by {diff}"


def test_vector_length_must_divide_the_layer():
    with pytest.raises(AdapterError, match=r"vector_length=12 does not divide in_features=32 of "
                                           r"'model.layers.0.self_attn.q_proj'.*e.g. 8"):
        add_adapter(tiny_llama(), VbLoraConfig(r=2, num_vectors=4, vector_length=12, target_modules=["q_proj"]))


def test_topk_above_the_bank_is_a_config_error():
    with pytest.raises(ConfigError, match="topk=5 exceeds num_vectors=4"):
        from tuneforge.adapters.config import validate_config

        validate_config(VbLoraConfig, {"num_vectors": 4, "topk": 5}, "adapter.yaml")


def test_adapter_from_a_top_k_file_serves_but_refuses_to_train(tmp_path):
    base = tiny_llama()
    model = copy.deepcopy(base)
    add_adapter(model, VbLoraConfig(r=2, num_vectors=8, vector_length=8, save_only_topk_weights=True,
                                    target_modules=["q_proj"]))
    save_adapter(model, tmp_path)
    served = copy.deepcopy(base)
    load_adapter(served, tmp_path)
    ids = sample_ids()
    torch.testing.assert_close(logits(served, ids), logits(model, ids), atol=1e-6, rtol=0)
    resumed = copy.deepcopy(base)
    load_adapter(resumed, tmp_path, trainable=True)
    resumed.train()
    with pytest.raises(AdapterError, match="save_only_topk_weights=true file.*not train"):
        resumed(ids)
