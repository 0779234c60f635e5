"""Prefix tuning: peft interop both ways, cached vs uncached generation, masks, positions, projection."""

from __future__ import annotations

import copy
import json

import peft
import pytest
import torch
from tiny_models import perturb_trainable, sample_ids, tiny_llama

from tuneforge.adapters import add_adapter, load_adapter, save_adapter
from tuneforge.adapters.model_level.prefix_tuning import PrefixTuningConfig
from tuneforge.errors import AdapterError
from tuneforge.models.cache_keyword import cache_keyword
from tuneforge.losses import token_loss_sum

VIRTUAL = 3


def logits(model, ids, **kwargs):
    with torch.no_grad():
        return model(ids, **kwargs).logits


def prefixed(seed: int = 2, **config):
    base = tiny_llama()
    model = copy.deepcopy(base)
    add_adapter(model, PrefixTuningConfig(num_virtual_tokens=VIRTUAL, **config))
    perturb_trainable(model, seed=seed)
    return base, model


def adapter_of(model):
    return model.tuneforge_model_adapters.adapters["default"]


def naive_logits(base, table, ids):
    """The base model given a legacy-style cache built by hand: (keys, values) per layer, GQA heads."""
    from transformers import DynamicCache

    layers, kv_heads, head_dim = 2, 2, 8
    split = table.view(VIRTUAL, layers, 2, kv_heads, head_dim)
    legacy = [(split[:, i, 0].transpose(0, 1)[None].expand(ids.shape[0], -1, -1, -1),
               split[:, i, 1].transpose(0, 1)[None].expand(ids.shape[0], -1, -1, -1)) for i in range(layers)]
    mask = torch.ones(ids.shape[0], VIRTUAL + ids.shape[1], dtype=torch.long)
    with torch.no_grad():
        return base(ids, attention_mask=mask, **{cache_keyword(base): DynamicCache(legacy)}).logits


def test_logits_match_a_hand_built_prefix_cache():
    base, model = prefixed()
    ids = sample_ids()
    expected = naive_logits(base, adapter_of(model).table().detach(), ids)
    torch.testing.assert_close(logits(model, ids), expected, atol=1e-5, rtol=0)
    assert (expected - logits(base, ids)).abs().max() > 1e-3


@pytest.mark.parametrize("projection", [False, True], ids=["plain", "projection"])
def test_saved_adapter_loads_in_peft_with_equal_logits(tmp_path, projection):
    extra = dict(prefix_projection=True, encoder_hidden_size=8) if projection else {}
    base, model = prefixed(**extra)
    save_adapter(model, tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (saved["token_dim"], saved["num_attention_heads"], saved["num_layers"]) == (16, 2, 2)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    ids = sample_ids()
    torch.testing.assert_close(logits(theirs, ids), logits(model, ids), atol=1e-5, rtol=0)


@pytest.mark.parametrize("projection", [False, True], ids=["plain", "projection"])
def test_peft_adapter_loads_in_tuneforge_with_equal_logits(tmp_path, projection):
    base = tiny_llama()
    extra = dict(prefix_projection=True, encoder_hidden_size=8) if projection else {}
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4, **extra))
    perturb_trainable(theirs)
    theirs.eval()
    ids = sample_ids()
    expected = logits(theirs, ids)
    theirs.save_pretrained(tmp_path)
    model = copy.deepcopy(base)
    load_adapter(model, tmp_path)
    torch.testing.assert_close(logits(model, ids), expected, atol=1e-5, rtol=0)


def test_projection_saves_the_projected_prefixes_and_reloads_them(tmp_path):
    base, model = prefixed(prefix_projection=True, encoder_hidden_size=8)
    projection = adapter_of(model).projection
    expected_table = projection.transform(projection.embedding).detach()
    save_adapter(model, tmp_path)
    fresh = copy.deepcopy(base)
    load_adapter(fresh, tmp_path)
    torch.testing.assert_close(adapter_of(fresh).table().detach(), expected_table, atol=1e-6, rtol=0)
    ids = sample_ids()
    torch.testing.assert_close(logits(fresh, ids), logits(model, ids), atol=1e-6, rtol=0)


@pytest.mark.parametrize("projection", [False, True], ids=["plain", "projection"])
def test_greedy_generation_is_the_same_with_and_without_cache(projection):
    extra = dict(prefix_projection=True, encoder_hidden_size=8) if projection else {}
    _, model = prefixed(seed=7, **extra)
    ids = sample_ids(batch=2, length=5)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # left padding in row 1
    with torch.no_grad():
        cached = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, use_cache=True, pad_token_id=0)
        uncached = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, use_cache=False, pad_token_id=0)
    assert torch.equal(cached, uncached)
    naive = ids[:1]
    for _ in range(8):
        next_token = logits(model, naive)[:, -1].argmax(-1, keepdim=True)
        naive = torch.cat([naive, next_token], dim=1)
    assert torch.equal(cached[:1], naive)


def test_left_padding_with_positions_gives_the_unpadded_logits():
    _, model = prefixed()
    ids = sample_ids(batch=1, length=6)
    padded = torch.cat([torch.zeros(1, 2, dtype=torch.long), ids], dim=1)
    mask = torch.cat([torch.zeros(1, 2, dtype=torch.long), torch.ones(1, 6, dtype=torch.long)], dim=1)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    out = logits(model, padded, attention_mask=mask, position_ids=positions)[:, 2:]
    torch.testing.assert_close(out, logits(model, ids), atol=1e-5, rtol=0)


def test_packed_rows_and_chunked_loss():
    from tuneforge.data import collate_packed
    from tuneforge.data.tokenization import TokenizedExample

    _, model = prefixed()
    first, second = sample_ids(batch=1, length=5, seed=3)[0], sample_ids(batch=1, length=4, seed=4)[0]
    batch = collate_packed([[TokenizedExample(t.tolist(), t.tolist()) for t in (first, second)]], 0, torch.float32)
    out = logits(model, batch["input_ids"], attention_mask=batch["attention_mask"], position_ids=batch["position_ids"])
    torch.testing.assert_close(out[:, :5], logits(model, first[None]), atol=1e-5, rtol=0)
    torch.testing.assert_close(out[:, 5:9], logits(model, second[None]), atol=1e-5, rtol=0)
    ids = sample_ids()
    total, count = token_loss_sum(model, {"input_ids": ids, "labels": ids})
    with torch.no_grad():
        torch.testing.assert_close(total / count, model(ids, labels=ids).loss, atol=1e-5, rtol=1e-5)


def test_training_gradients_reach_the_reparameterisation():
    _, model = prefixed(prefix_projection=True, encoder_hidden_size=8)
    model.train()
    ids = sample_ids()
    model(ids, labels=ids).loss.backward()
    grads = {n: p.grad for n, p in adapter_of(model).named_parameters()}
    assert set(grads) == {"projection.embedding", "projection.transform.0.weight", "projection.transform.0.bias",
                          "projection.transform.2.weight", "projection.transform.2.bias"}
    assert all(g is not None and g.abs().sum() > 0 for g in grads.values())


def test_too_many_positions_name_both_numbers():
    with pytest.raises(AdapterError, match="num_virtual_tokens=128 .* max_position_embeddings=128"):
        add_adapter(tiny_llama(), PrefixTuningConfig(num_virtual_tokens=128))
    _, model = prefixed()
    with pytest.raises(AdapterError, match=r"num_virtual_tokens=3 \+ 126 input positions = 129"):
        model(torch.zeros(1, 126, dtype=torch.long))


def test_gradient_checkpointing_is_refused_clearly():
    _, model = prefixed()
    model.train()
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    ids = sample_ids()
    with pytest.raises(AdapterError, match="gradient checkpointing.*training.gradient_checkpointing=false"):
        model(ids, labels=ids)
    model.eval()
    assert model(ids).logits.shape[1] == ids.shape[1]  # evaluation is unaffected


def test_training_run_resumes_with_the_projection(tmp_path):
    """Files hold the projected prefixes only; checkpoints keep the projection so a resume continues it."""
    from tiny_models import tiny_chat_model_and_tokenizer

    from tuneforge.config import parse_train_config
    from tuneforge.train import train

    def config(name):
        return parse_train_config({
            "output_dir": str(tmp_path / name),
            "adapter": {"method": "prefix-tuning", "num_virtual_tokens": 3, "prefix_projection": True,
                        "encoder_hidden_size": 8},
            "data": {"train": "arithmetic", "options": {"size": 24}, "max_seq_len": 160, "eval_size": 4},
            "training": {"max_steps": 4, "batch_size": 4, "lr": 1e-2, "log_every": 1, "save_every": 2, "seed": 3},
        })

    full = []
    train(config("full"), model_and_tokenizer=tiny_chat_model_and_tokenizer(), on_step=lambda s, loss: full.append(loss))
    assert full[-1] < full[0]

    def stop_after_two(step, loss):
        if step == 2:
            raise KeyboardInterrupt

    train(config("partial"), model_and_tokenizer=tiny_chat_model_and_tokenizer(), on_step=stop_after_two)
    resumed = []
    train(config("partial"), resume=True, model_and_tokenizer=tiny_chat_model_and_tokenizer(),
          on_step=lambda s, loss: resumed.append(loss))
    assert resumed == pytest.approx(full[2:], rel=1e-5, abs=1e-6)
