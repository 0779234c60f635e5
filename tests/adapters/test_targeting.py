"""Target selection semantics (PEFT-compatible) and multi-adapter bookkeeping."""

from __future__ import annotations

import pytest
import torch
from tiny_models import perturb_trainable, sample_ids, tiny_gpt2, tiny_llama

from tuneforge.adapters import (
    LoraConfig,
    add_adapter,
    delete_adapter,
    loraplus_param_groups,
    set_active_adapters,
    trainable_parameters,
)
from tuneforge.adapters.model import wrapped_layers


def targets(model, **kwargs):
    return add_adapter(model, LoraConfig(r=2, **kwargs))


def test_suffix_list_matches_exact_and_dotted_suffix_only():
    names = targets(tiny_llama(), target_modules=["q_proj", "model.layers.1.mlp.up_proj"])
    assert names == [
        "model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj", "model.layers.1.mlp.up_proj",
    ]


def test_regex_must_match_whole_name():
    assert targets(tiny_llama(), target_modules=r".*layers\.0\..*_proj") == [
        f"model.layers.0.{n}" for n in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                        "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
    ]


def test_all_linear_skips_output_head_and_exclude_applies():
    names = targets(tiny_llama(), target_modules="all-linear", exclude_modules=["down_proj"])
    assert len(names) == 2 * 6 and "lm_head" not in names and not any("down_proj" in n for n in names)
    assert len(targets(tiny_gpt2(), target_modules="all-linear")) == 2 * 4


def test_layers_to_transform_and_pattern():
    assert targets(tiny_llama(), target_modules=["v_proj"], layers_to_transform=1) == ["model.layers.1.self_attn.v_proj"]
    assert targets(tiny_gpt2(), target_modules=["c_attn"], layers_to_transform=[0], layers_pattern="h") == [
        "transformer.h.0.attn.c_attn"
    ]


def test_trainable_count_matches_formula():
    model = tiny_llama()
    base_total = sum(p.numel() for p in model.parameters())
    add_adapter(model, LoraConfig(r=4, target_modules=["q_proj", "k_proj"]))
    # q: 32->32, k: 32->16, 2 layers; LoRA has r*(in+out) parameters per layer.
    expected = 2 * (4 * (32 + 32) + 4 * (32 + 16))
    assert trainable_parameters(model) == (expected, base_total + expected)


def test_two_active_adapters_add_their_deltas():
    base = tiny_llama()
    ids = sample_ids()
    with torch.no_grad():
        reference = base(ids).logits
    add_adapter(base, LoraConfig(r=2, target_modules=["q_proj"]), "one")
    add_adapter(base, LoraConfig(r=2, target_modules=["q_proj"]), "two")
    perturb_trainable(base, seed=3)  # perturbs "two" (trainable)
    layer = base.model.layers[0].self_attn.q_proj
    with torch.no_grad():
        layer.adapters["one"].lora_B.normal_()
        x = torch.randn(3, 32)
        base_out = layer.base_layer(x)
        set_active_adapters(base, ["one", "two"])
        both = layer(x)
        expected = base_out + sum(layer.adapters[n].lora_output(x) for n in ("one", "two"))
    torch.testing.assert_close(both, expected)
    delete_adapter(base, "one")
    delete_adapter(base, "two")
    with torch.no_grad():
        torch.testing.assert_close(base(ids).logits, reference)
    assert not list(wrapped_layers(base))


def test_per_row_adapters_equal_separate_runs():
    model = tiny_llama()
    for name in ("a", "b"):
        add_adapter(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]), name)
        perturb_trainable(model, seed=ord(name))
    ids = sample_ids(batch=3)
    expected = []
    for row, name in enumerate(["a", None, "b"]):
        set_active_adapters(model, [name] if name else [])
        with torch.no_grad():
            expected.append(model(ids[row:row + 1]).logits)
    for _, layer in wrapped_layers(model):
        layer.row_adapters = ["a", None, "b"]
    with torch.no_grad():
        batched = model(ids).logits
    torch.testing.assert_close(batched, torch.cat(expected), atol=1e-5, rtol=1e-5)


def test_loraplus_groups_give_b_its_own_learning_rate():
    model = tiny_llama()
    add_adapter(model, LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"]))
    groups = loraplus_param_groups(model, lr=1e-4, loraplus_ratio=16)
    by_name = {g["name"]: g for g in groups}
    assert by_name["lora_B"]["lr"] == pytest.approx(1.6e-3)
    b_ids = {id(layer.adapters["default"].lora_B) for _, layer in wrapped_layers(model)}
    assert {id(p) for p in by_name["lora_B"]["params"]} == b_ids
    all_trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert {id(p) for g in groups for p in g["params"]} == all_trainable
    plain = loraplus_param_groups(model, lr=1e-4)
    assert len(plain) == 1 and len(plain[0]["params"]) == len(all_trainable)
