"""DyLoRA: every truncated rank is exactly a LoRA with the truncated A, B; training samples one rank per
forward and (paper's frozen variant) trains only that rank's component."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_models import perturb_trainable, sample_ids, tiny_llama

from tuneforge.adapters import LoraConfig, add_adapter, merge_adapters
from tuneforge.adapters.rank.dylora import DyLoraConfig, set_dylora_rank
from tuneforge.adapters.model import wrapped_layers
from tuneforge.config import parse_train_config
from tuneforge.errors import AdapterError, ConfigError

TARGETS = ["q_proj", "v_proj", "down_proj"]


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def dylora_model(**settings):
    base = tiny_llama()
    model = copy.deepcopy(base)
    add_adapter(model, DyLoraConfig(**{"r": 6, "alpha": 12.0, "target_modules": TARGETS, **settings}))
    perturb_trainable(model, scale=0.2)
    return base, model


def adapters(model):
    return [(name, layer.adapters["default"]) for name, layer in wrapped_layers(model)]


def lora_with_truncated_weights(base, model, rank):
    """The reference: a plain LoRA of rank b (scaling alpha / b) holding A[:b] and B[:, :b]."""
    reference = copy.deepcopy(base)
    add_adapter(reference, LoraConfig(r=rank, alpha=12.0, target_modules=TARGETS))
    theirs = dict(adapters(model))
    with torch.no_grad():
        for name, lora in adapters(reference):
            lora.lora_A.copy_(theirs[name].lora_A[:rank])
            lora.lora_B.copy_(theirs[name].lora_B[:, :rank])
    return reference


@pytest.mark.parametrize("rank", [1, 2, 4, 6])
def test_truncated_rank_equals_lora_with_truncated_factors(rank):
    base, model = dylora_model()
    ids = sample_ids()
    assert set_dylora_rank(model, rank) == 6
    expected = logits(lora_with_truncated_weights(base, model, rank), ids)
    torch.testing.assert_close(logits(model, ids), expected, atol=1e-6, rtol=0)


def test_eval_rank_defaults_to_r_and_config_sets_it():
    _, model = dylora_model()
    assert all(adapter.eval_rank == 6 for _, adapter in adapters(model))
    _, model = dylora_model(eval_rank=3)
    assert all(adapter.eval_rank == 3 for _, adapter in adapters(model))


def test_training_forward_uses_one_sampled_rank_in_every_layer():
    base, model = dylora_model(min_r=2)
    ids = sample_ids()
    model.train()
    sampled = []
    for _ in range(8):
        with torch.no_grad():
            train_logits = model(ids).logits
        ranks = {adapter.last_sampled_rank for _, adapter in adapters(model)}
        assert len(ranks) == 1, f"layers sampled different ranks in one forward: {ranks}"
        (rank,) = ranks
        sampled.append(rank)
        expected = logits(lora_with_truncated_weights(base, model, rank), ids)
        torch.testing.assert_close(train_logits, expected, atol=1e-6, rtol=0)
    assert all(2 <= b <= 6 for b in sampled) and len(set(sampled)) > 1
    # Seeded: a second model with the same seed draws the same ranks.
    _, again = dylora_model(min_r=2)
    again.train()
    replay = []
    for _ in range(8):
        with torch.no_grad():
            again(ids)
        replay.append(adapters(again)[0][1].last_sampled_rank)
    assert replay == sampled


@pytest.mark.parametrize("train_lower_ranks", [False, True])
def test_only_the_sampled_component_gets_gradients_in_the_frozen_variant(train_lower_ranks):
    _, model = dylora_model(min_r=3, train_lower_ranks=train_lower_ranks)
    model.train()
    ids = sample_ids()
    model(ids, labels=ids).loss.backward()
    for _, adapter in adapters(model):
        b = adapter.last_sampled_rank
        a_rows = adapter.lora_A.grad.abs().sum(dim=1)
        b_cols = adapter.lora_B.grad.abs().sum(dim=0)
        assert a_rows[b - 1] > 0 and b_cols[b - 1] > 0
        assert torch.all(a_rows[b:] == 0) and torch.all(b_cols[b:] == 0), "ranks above b must not train"
        if train_lower_ranks:
            assert torch.all(a_rows[: b - 1] > 0) and torch.all(b_cols[: b - 1] > 0)
        else:
            assert torch.all(a_rows[: b - 1] == 0) and torch.all(b_cols[: b - 1] == 0), "lower ranks must be detached"


def test_chosen_rank_survives_save_and_load(tmp_path):
    from tuneforge.adapters import load_adapter, save_adapter

    base, model = dylora_model()
    set_dylora_rank(model, 3)
    ids = sample_ids()
    expected = logits(model, ids)
    save_adapter(model, tmp_path)
    fresh = copy.deepcopy(base)
    load_adapter(fresh, tmp_path)
    assert all(adapter.eval_rank == 3 for _, adapter in adapters(fresh))
    torch.testing.assert_close(logits(fresh, ids), expected, atol=1e-6, rtol=0)


def test_merge_uses_the_eval_rank():
    base, model = dylora_model()
    set_dylora_rank(model, 2)
    ids = sample_ids()
    expected = logits(lora_with_truncated_weights(base, model, 2), ids)
    merge_adapters(model)
    torch.testing.assert_close(logits(model, ids), expected, atol=1e-5, rtol=1e-4)


def test_bad_ranks_are_clear_errors():
    _, model = dylora_model()
    with pytest.raises(AdapterError, match=r"DyLoRA rank 7 .* outside \[1, 6\]"):
        set_dylora_rank(model, 7)
    with pytest.raises(AdapterError, match=r"outside \[1, 6\]"):
        set_dylora_rank(model, 0)
    merge_adapters(model)
    with pytest.raises(AdapterError, match="unmerge_adapters"):
        set_dylora_rank(model, 2)
    with pytest.raises(AdapterError, match="no DyLoRA adapter"):
        set_dylora_rank(tiny_llama(), 2)
    with pytest.raises(ConfigError, match=r"min_r=5 is larger than r=4"):
        parse_train_config({"adapter": {"method": "dylora", "r": 4, "min_r": 5}})
    with pytest.raises(ConfigError, match=r"eval_rank=9 is larger than r=4"):
        parse_train_config({"adapter": {"method": "dylora", "r": 4, "eval_rank": 9}})


def test_draw_count_is_checkpointed_so_a_resumed_run_samples_the_same_ranks():
    from tuneforge.adapters.hooks import training_hooks

    _, model = dylora_model(min_r=1)
    ids = sample_ids()
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(ids)
    state = training_hooks(model, "default").state_dict()
    assert state == {"0": {"draws": [3] * 6}}  # one hook in the chain
    _, resumed = dylora_model(min_r=1)
    training_hooks(resumed, "default").load_state_dict(state)
    resumed.train()
    with torch.no_grad():
        model(ids)
        resumed(ids)
    assert adapters(resumed)[0][1].last_sampled_rank == adapters(model)[0][1].last_sampled_rank
