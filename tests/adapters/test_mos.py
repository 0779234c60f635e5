"""MoS: factors assembled from shared shard pools, parameter counts, and gradients of shared shards."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_models import perturb_trainable, sample_ids, tiny_chat_model_and_tokenizer, tiny_llama

from tuneforge.adapters import AdaptedLayer, add_adapter, trainable_parameters
from tuneforge.adapters.sharing.mos import MosConfig
from tuneforge.config import parse_train_config
from tuneforge.errors import AdapterError
from tuneforge.train import train

TARGETS = ["q_proj", "k_proj", "v_proj", "down_proj"]


def mos_layers(model):
    return {name: m.adapters["default"] for name, m in model.named_modules() if isinstance(m, AdaptedLayer)}


def test_trainable_parameter_count_formula():
    model = tiny_llama()
    add_adapter(model, MosConfig(r=4, shards_per_vector=4, private_shards=1, pool_size=24, target_modules=TARGETS))
    # shard lengths (size / 4): A: q,k,v in 32 -> 8, down in 64 -> 16;
    #                           B: q out 32 -> 8, k,v out 16 -> 4, down out 32 -> 8
    pools = 24 * (8 + 16) + 24 * (8 + 4)
    # one private shard per vector: r x (A shard + B shard) per layer, q + k + v + down, two decoder layers
    private = 2 * 4 * ((8 + 8) + (8 + 4) + (8 + 4) + (16 + 8))
    assert trainable_parameters(model)[0] == pools + private == 1376


def test_factors_are_concatenated_pool_and_private_shards():
    model = tiny_llama()
    add_adapter(model, MosConfig(r=3, shards_per_vector=4, private_shards=1, pool_size=16,
                                 target_modules=["down_proj"]))
    perturb_trainable(model, scale=0.5)
    layer = model.model.layers[1].mlp.down_proj
    adapter = layer.adapters["default"]
    pool_a = adapter.pools.pools["A_16"].detach()
    pool_b = adapter.pools.pools["B_8"].detach()
    lora_a, lora_b = torch.zeros(3, 64), torch.zeros(32, 3)
    for i in range(3):
        for slot in range(3):
            lora_a[i, 16 * slot:16 * (slot + 1)] = pool_a[adapter.mos_A_index[i, slot]]
            lora_b[8 * slot:8 * (slot + 1), i] = pool_b[adapter.mos_B_index[i, slot]]
        lora_a[i, 48:] = adapter.mos_A_private[i, 0].detach()
        lora_b[24:, i] = adapter.mos_B_private[i, 0].detach()
    x = torch.randn(2, 64)
    expected = layer.base_layer(x) + adapter.scaling * x @ (lora_b @ lora_a).T
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=0)


def test_subsets_are_distinct_fixed_and_dissociated_between_a_and_b():
    config = dict(r=4, shards_per_vector=2, pool_size=16, target_modules=["q_proj", "o_proj"])
    first, second = tiny_llama(), tiny_llama()
    add_adapter(first, MosConfig(**config))
    add_adapter(second, MosConfig(**config))
    layers, again = mos_layers(first), mos_layers(second)
    for name, adapter in layers.items():
        assert adapter.mos_A_index.unique().numel() == adapter.mos_A_index.numel() == 8
        assert torch.equal(adapter.mos_A_index, again[name].mos_A_index)
        assert not torch.equal(adapter.mos_A_index, adapter.mos_B_index)
    tables = [adapter.mos_A_index for adapter in layers.values()]
    assert not torch.equal(tables[0], tables[1]), "two layers drew the same subset"
    other_seed = tiny_llama()
    add_adapter(other_seed, MosConfig(**config, seed=1))
    assert not torch.equal(next(iter(mos_layers(other_seed).values())).mos_A_index, tables[0])


def test_shared_shards_collect_the_gradients_of_every_layer_using_them():
    base = tiny_llama()
    model = copy.deepcopy(base)
    add_adapter(model, MosConfig(r=4, shards_per_vector=2, pool_size=10, target_modules=["q_proj", "k_proj"]))
    perturb_trainable(model, scale=0.3)
    ids = sample_ids()
    model(ids, labels=ids).loss.backward()
    layers = mos_layers(model)
    shared_pools = next(iter(layers.values())).pools.pools
    # Same model, but every layer's A and B as its own leaf tensors: nothing shared.
    unshared = copy.deepcopy(model)
    leaves = {}
    for name, adapter in mos_layers(unshared).items():
        lora_a, lora_b = (t.detach().clone().requires_grad_(True) for t in adapter.factors())
        leaves[name] = (lora_a, lora_b)
        adapter.factors = lambda pair=(lora_a, lora_b): pair
    unshared(ids, labels=ids).loss.backward()
    expected = {key: torch.zeros_like(pool) for key, pool in shared_pools.items()}
    for name, adapter in layers.items():
        lora_a, lora_b = leaves[name]
        grad_a = lora_a.grad.reshape(4, 2, -1)  # (r, shards, shard length)
        grad_b = lora_b.grad.T.reshape(4, 2, -1)
        expected[adapter.key_a].index_add_(0, adapter.mos_A_index.reshape(-1), grad_a.reshape(8, -1))
        expected[adapter.key_b].index_add_(0, adapter.mos_B_index.reshape(-1), grad_b.reshape(8, -1))
    used = torch.cat([a.mos_A_index.reshape(-1) for a in layers.values()])
    assert used.numel() > used.unique().numel(), "the test needs layers that share shards"
    for key, pool in shared_pools.items():
        torch.testing.assert_close(pool.grad, expected[key], atol=1e-6, rtol=1e-5)


def test_shards_must_divide_the_layer():
    with pytest.raises(AdapterError, match=r"shards_per_vector=3 does not divide in_features=32 of "
                                           r"'model.layers.0.self_attn.q_proj'"):
        add_adapter(tiny_llama(), MosConfig(r=2, shards_per_vector=3, target_modules=["q_proj"]))


def test_pool_too_small_for_the_subset_is_refused():
    with pytest.raises(AdapterError, match=r"pool_size=5 is too small.*= 8 distinct shards.*at least 8"):
        add_adapter(tiny_llama(), MosConfig(r=4, shards_per_vector=2, pool_size=5, target_modules=["q_proj"]))


def test_resumed_training_restores_the_shared_pools(tmp_path):
    """Pools and private shards go through AdamW and the checkpoint: a resumed run takes the same steps."""
    def config(name):
        return parse_train_config({
            "output_dir": str(tmp_path / name),
            "adapter": {"method": "mos", "r": 2, "pool_size": 16, "private_shards": 1, "dropout": 0.1},
            "data": {"train": "arithmetic", "options": {"size": 48}, "max_seq_len": 192, "eval_size": 8},
            "training": {"max_steps": 6, "batch_size": 4, "lr": 5e-3, "log_every": 1, "save_every": 3, "seed": 7},
        })

    def stop_after_four(step, loss):
        if step == 4:
            raise KeyboardInterrupt

    full, resumed = [], []
    train(config("full"), model_and_tokenizer=tiny_chat_model_and_tokenizer(), on_step=lambda s, loss: full.append(loss))
    train(config("partial"), model_and_tokenizer=tiny_chat_model_and_tokenizer(), on_step=stop_after_four)
    train(config("partial"), resume=True, model_and_tokenizer=tiny_chat_model_and_tokenizer(),
          on_step=lambda s, loss: resumed.append(loss))
    assert full[-1] < full[0] - 0.1
    assert resumed == pytest.approx(full[4:], rel=1e-5, abs=1e-6)
