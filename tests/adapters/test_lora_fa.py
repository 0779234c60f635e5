"""LoRA-FA: A stays at its random init, only B trains; the file is a plain LoRA that peft loads."""

from __future__ import annotations

import copy

import peft
import pytest
import torch
from tiny_models import perturb_trainable, sample_ids, tiny_llama

from tuneforge.adapters import add_adapter, load_adapter, loraplus_param_groups, save_adapter
from tuneforge.adapters.rank.lora_fa import LoraFaConfig, LoraFaLinear
from tuneforge.adapters.model import wrapped_layers
from tuneforge.config import parse_train_config
from tuneforge.errors import ConfigError

TARGETS = ["q_proj", "v_proj", "gate_proj"]


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def adapters(model):
    return [layer.adapters["default"] for _, layer in wrapped_layers(model)]


def test_one_step_changes_b_and_never_a():
    model = tiny_llama()
    add_adapter(model, LoraFaConfig(r=4, target_modules=TARGETS))
    groups = loraplus_param_groups(model, 1e-2)
    optimizer = torch.optim.AdamW(groups)
    a_before = [adapter.lora_A.clone() for adapter in adapters(model)]
    b_before = [adapter.lora_B.detach().clone() for adapter in adapters(model)]
    assert all(not adapter.lora_A.requires_grad for adapter in adapters(model))
    assert all(a.abs().sum() > 0 for a in a_before), "A must be a random projection, not zeros"
    ids = sample_ids()
    model.train()
    for _ in range(2):
        model(ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    for adapter, a, b in zip(adapters(model), a_before, b_before):
        assert torch.equal(adapter.lora_A, a)
        assert not torch.equal(adapter.lora_B.detach(), b)
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == {id(adapter.lora_B) for adapter in adapters(model)}


def test_file_loads_in_peft_as_lora_and_back_as_lora_fa(tmp_path):
    base = tiny_llama()
    model = copy.deepcopy(base)
    add_adapter(model, LoraFaConfig(r=4, alpha=8, target_modules=TARGETS))
    perturb_trainable(model, scale=0.2)
    ids = sample_ids()
    expected = logits(model, ids)
    save_adapter(model, tmp_path)
    assert peft.PeftConfig.from_pretrained(tmp_path).peft_type == "LORA"
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    diff = (logits(theirs, ids) - expected).abs().max().item()
    assert diff <= 1e-5, f"peft's logits differ by {diff}"
    fresh = copy.deepcopy(base)
    config = load_adapter(fresh, tmp_path)
    assert config.method == "lora-fa" and all(isinstance(a, LoraFaLinear) for a in adapters(fresh))
    torch.testing.assert_close(logits(fresh, ids), expected, atol=1e-6, rtol=0)


def test_dora_is_refused():
    with pytest.raises(ConfigError, match="use_dora=true does not combine with lora-fa"):
        parse_train_config({"adapter": {"method": "lora-fa", "use_dora": True}})
