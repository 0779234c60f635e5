"""LN tuning: which modules it picks, that the copy replaces the norm, merge/unmerge, peft interop."""

from __future__ import annotations

import copy

import peft
import pytest
import torch
from tiny_models import perturb_trainable, sample_ids, tiny_gpt2, tiny_llama

from tuneforge.adapters import add_adapter, load_adapter, merge_adapters, save_adapter, unmerge_adapters
from tuneforge.adapters.selective.ln_tuning import LNTuningConfig
from tuneforge.errors import AdapterError


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_all_norms_selects_every_norm_class_and_nothing_else():
    llama = tiny_llama()
    targets = add_adapter(llama, LNTuningConfig())
    assert targets == [
        "model.layers.0.input_layernorm", "model.layers.0.post_attention_layernorm",
        "model.layers.1.input_layernorm", "model.layers.1.post_attention_layernorm", "model.norm",
    ]
    gpt2 = tiny_gpt2()
    assert len(add_adapter(gpt2, LNTuningConfig())) == 5  # ln_1, ln_2 per block + ln_f


def test_trained_copy_replaces_the_norm_output():
    model = tiny_llama()
    add_adapter(model, LNTuningConfig(target_modules=["norm"]))
    perturb_trainable(model, scale=0.5)
    wrapper = model.model.norm
    copy_weight = wrapper.adapters["default"].ln_tuning_layers.weight
    x = torch.randn(2, 5, 32)
    variance = x.pow(2).mean(-1, keepdim=True)
    expected = copy_weight * (x * torch.rsqrt(variance + model.config.rms_norm_eps))  # RMSNorm by hand
    with torch.no_grad():
        torch.testing.assert_close(wrapper(x), expected)


def test_merge_writes_the_copy_and_unmerge_restores_exactly():
    model = tiny_gpt2()
    original = copy.deepcopy(model)
    add_adapter(model, LNTuningConfig(target_modules=["ln_f"]))
    perturb_trainable(model, scale=0.5)
    tuned = model.transformer.ln_f.adapters["default"].ln_tuning_layers
    merge_adapters(model)
    torch.testing.assert_close(model.transformer.ln_f.base_layer.weight, tuned.weight, atol=0, rtol=0)
    torch.testing.assert_close(model.transformer.ln_f.base_layer.bias, tuned.bias, atol=0, rtol=0)
    unmerge_adapters(model)
    assert torch.equal(model.transformer.ln_f.base_layer.weight, original.transformer.ln_f.weight)
    assert torch.equal(model.transformer.ln_f.base_layer.bias, original.transformer.ln_f.bias)


def test_targeting_a_linear_layer_is_a_clear_error():
    with pytest.raises(AdapterError, match="q_proj' is a Linear"):
        add_adapter(tiny_llama(), LNTuningConfig(target_modules=["q_proj"]))


INTEROP = [
    ("llama", tiny_llama, ["input_layernorm", "post_attention_layernorm", "norm"]),
    ("gpt2", tiny_gpt2, ["ln_1", "ln_2", "ln_f"]),
]


@pytest.mark.parametrize("case_id,make_model,targets", INTEROP, ids=[c[0] for c in INTEROP])
def test_tuneforge_ln_tuning_loads_in_peft(case_id, make_model, targets, tmp_path):
    base = make_model()
    model = copy.deepcopy(base)
    add_adapter(model, LNTuningConfig(target_modules=targets))
    perturb_trainable(model, scale=0.3)
    save_adapter(model, tmp_path)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    ids = sample_ids()
    diff = (logits(theirs, ids) - logits(model, ids)).abs().max().item()
    assert diff <= 1e-5, f"peft's logits differ by {diff}"
    assert (logits(model, ids) - logits(base, ids)).abs().max() > 1e-3


@pytest.mark.parametrize("case_id,make_model,targets", INTEROP, ids=[c[0] for c in INTEROP])
def test_peft_ln_tuning_loads_in_tuneforge(case_id, make_model, targets, tmp_path):
    base = make_model()
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LNTuningConfig(target_modules=targets))
    perturb_trainable(theirs, scale=0.3)
    theirs.eval()
    ids = sample_ids()
    expected = logits(theirs, ids)
    theirs.save_pretrained(tmp_path)
    model = copy.deepcopy(base)
    load_adapter(model, tmp_path)
    diff = (logits(model, ids) - expected).abs().max().item()
    assert diff <= 1e-5, f"tuneforge's logits differ from peft's by {diff}"
