"""Adapter files move both ways between tuneforge and the `peft` package (a test oracle only)."""

from __future__ import annotations

import copy

import peft
import pytest
import torch
from tiny_models import perturb_trainable, sample_ids, tiny_gpt2, tiny_llama

from tuneforge.adapters import LoraConfig, add_adapter, load_adapter, save_adapter

INTEROP = [
    ("lora", tiny_llama, dict(r=4, alpha=8, target_modules=["q_proj", "v_proj"])),
    ("rslora", tiny_llama, dict(r=4, alpha=8, use_rslora=True, target_modules=["q_proj", "o_proj"])),
    ("dora", tiny_llama, dict(r=4, use_dora=True, target_modules=["q_proj", "v_proj", "down_proj"])),
    ("rank-pattern", tiny_llama, dict(r=4, target_modules=["q_proj", "v_proj"], rank_pattern={"v_proj": 2},
                                      alpha_pattern={"q_proj": 2.0})),
    ("modules-to-save", tiny_llama, dict(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"])),
    ("embedding", tiny_llama, dict(r=4, target_modules=["embed_tokens", "k_proj"])),
    ("gpt2-lora", tiny_gpt2, dict(r=4, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True)),
    ("gpt2-dora", tiny_gpt2, dict(r=4, use_dora=True, target_modules=["c_attn"], fan_in_fan_out=True)),
]
PEFT_NAMES = {"alpha": "lora_alpha", "dropout": "lora_dropout"}


def peft_config(kwargs: dict) -> peft.LoraConfig:
    return peft.LoraConfig(**{PEFT_NAMES.get(k, k): v for k, v in kwargs.items()})


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("case_id,make_model,kwargs", INTEROP, ids=[c[0] for c in INTEROP])
def test_tuneforge_adapter_loads_in_peft(case_id, make_model, kwargs, tmp_path):
    base = make_model()
    model = copy.deepcopy(base)
    add_adapter(model, LoraConfig(**kwargs))
    perturb_trainable(model)
    ids = sample_ids()
    save_adapter(model, tmp_path)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    diff = (logits(theirs, ids) - logits(model, ids)).abs().max().item()
    assert diff <= 1e-5, f"peft's logits differ by {diff}"


@pytest.mark.parametrize("case_id,make_model,kwargs", INTEROP, ids=[c[0] for c in INTEROP])
def test_peft_adapter_loads_in_tuneforge(case_id, make_model, kwargs, tmp_path):
    base = make_model()
    theirs = peft.get_peft_model(copy.deepcopy(base), peft_config(kwargs))
    perturb_trainable(theirs)
    theirs.eval()
    ids = sample_ids()
    expected = logits(theirs, ids)
    theirs.save_pretrained(tmp_path)
    model = copy.deepcopy(base)
    load_adapter(model, tmp_path)
    diff = (logits(model, ids) - expected).abs().max().item()
    assert diff <= 1e-5, f"tuneforge's logits differ from peft's by {diff}"
