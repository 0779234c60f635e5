"""Adaption prompts (LLaMA-Adapter): zero-gate identity, a naive formula, peft interop both ways."""

from __future__ import annotations

import copy
import json
import math

import peft
import pytest
import torch
from tiny_models import perturb_trainable, sample_ids, tiny_gpt2, tiny_llama

from tuneforge.adapters import add_adapter, disabled_adapters, load_adapter, save_adapter
from tuneforge.adapters.model_level.adaption_prompt import AdaptionPromptConfig
from tuneforge.errors import AdapterError


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def adapted(layers: int = 1, length: int = 4):
    base = tiny_llama()
    model = copy.deepcopy(base)
    add_adapter(model, AdaptionPromptConfig(adapter_len=length, adapter_layers=layers))
    return base, model


def test_zero_gate_is_identity_and_only_the_top_layers_are_adapted():
    base, model = adapted(layers=1)
    ids = sample_ids()
    torch.testing.assert_close(logits(model, ids), logits(base, ids), atol=0, rtol=0)
    assert model.tuneforge_model_adapters.adapters["default"].attention_paths == ["model.layers.1.self_attn"]


def test_attention_output_matches_a_naive_formula():
    _, model = adapted(layers=1, length=3)
    perturb_trainable(model)
    attention = model.model.layers[1].self_attn
    captured = {}
    attention.register_forward_hook(lambda m, a, kw, out: captured.update(kw=kw, out=out[0]), with_kwargs=True)
    ids = sample_ids()
    with torch.no_grad():
        model(ids)
    adapted_out, kwargs = captured["out"], captured["kw"]
    with torch.no_grad(), disabled_adapters(model):
        model(ids)  # layer 0 is not adapted, so layer 1 sees the same input
    plain = captured["out"]
    prompt = model.tuneforge_model_adapters.adapters["default"].prompts[0]
    hidden, (cos, sin) = kwargs["hidden_states"], kwargs["position_embeddings"]
    batch, tokens, heads, head_dim = hidden.shape[0], hidden.shape[1], 4, 8
    with torch.no_grad():
        q = attention.q_proj(hidden).view(batch, tokens, heads, head_dim)
        half = head_dim // 2
        rotated = torch.cat([-q[..., half:], q[..., :half]], dim=-1)
        q = q * cos[:, :, None] + rotated * sin[:, :, None]
        k = attention.k_proj(prompt.adaption_prompt[0]).view(3, 2, head_dim)
        v = attention.v_proj(prompt.adaption_prompt[0]).view(3, 2, head_dim)
        expected = torch.zeros(batch, tokens, heads, head_dim)
        for h in range(heads):
            kv = h // 2  # heads 0,1 share kv head 0; heads 2,3 kv head 1
            weights = torch.softmax(q[:, :, h] @ k[:, kv].T / math.sqrt(head_dim), dim=-1)
            expected[:, :, h] = prompt.adaption_gate * (weights @ v[:, kv])
        expected = plain + attention.o_proj(expected.reshape(batch, tokens, heads * head_dim))
    torch.testing.assert_close(adapted_out, expected, atol=1e-5, rtol=0)


def test_saved_adapter_loads_in_peft_with_equal_logits(tmp_path):
    base, model = adapted(layers=2)
    perturb_trainable(model)
    save_adapter(model, tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (saved["peft_type"], saved["adapter_len"], saved["adapter_layers"]) == ("ADAPTION_PROMPT", 4, 2)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    ids = sample_ids()
    torch.testing.assert_close(logits(theirs, ids), logits(model, ids), atol=1e-5, rtol=0)


def test_peft_adapter_loads_in_tuneforge_with_equal_logits(tmp_path):
    base = tiny_llama()
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.AdaptionPromptConfig(task_type="CAUSAL_LM", adapter_len=5,
                                                                                 adapter_layers=2))
    perturb_trainable(theirs)
    theirs.eval()
    ids = sample_ids()
    expected = logits(theirs, ids)
    assert (expected - logits(base, ids)).abs().max() > 1e-3
    theirs.save_pretrained(tmp_path)
    model = copy.deepcopy(base)
    load_adapter(model, tmp_path)
    torch.testing.assert_close(logits(model, ids), expected, atol=1e-5, rtol=0)


def test_generation_with_and_without_cache_agree():
    _, model = adapted(layers=2)
    perturb_trainable(model, scale=0.5)
    ids = sample_ids(batch=2, length=5)
    with torch.no_grad():
        cached = model.generate(ids, max_new_tokens=6, do_sample=False, use_cache=True, pad_token_id=0)
        uncached = model.generate(ids, max_new_tokens=6, do_sample=False, use_cache=False, pad_token_id=0)
    assert torch.equal(cached, uncached)


def test_bad_layer_counts_and_models_are_clear_errors():
    with pytest.raises(AdapterError, match="adapter_layers=3 but LlamaForCausalLM has 2 decoder layers; use 1..2"):
        add_adapter(tiny_llama(), AdaptionPromptConfig(adapter_layers=3))
    with pytest.raises(AdapterError, match="Llama-style attention"):
        add_adapter(tiny_gpt2(), AdaptionPromptConfig())


def test_gradient_checkpointing_gives_the_same_gradients():
    _, model = adapted(layers=2)
    perturb_trainable(model)
    grads = []
    for checkpointed in (False, True):
        replica = copy.deepcopy(model).train()
        if checkpointed:
            replica.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        ids = sample_ids()
        replica(ids, labels=ids).loss.backward()
        grads.append({n: p.grad.clone() for n, p in replica.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-6, rtol=1e-5, msg=name)
