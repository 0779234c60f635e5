"""LoRETTA: ΔW rebuilt from tensor-train cores against an entry-by-entry product, and parameter counts."""

from __future__ import annotations

import math

import torch
from tiny_models import perturb_trainable, tiny_gpt2, tiny_llama

from tuneforge.adapters import add_adapter, merge_adapters, trainable_parameters
from tuneforge.adapters.loretta import LorettaConfig, balanced_factors, tt_to_matrix


def unravel(index: int, factors: list[int]) -> list[int]:
    """Row-major digits of ``index`` in the mixed radix ``factors``."""
    digits = []
    for size in reversed(factors):
        digits.append(index % size)
        index //= size
    return digits[::-1]


def naive_tt_entry(cores, row: int, col: int) -> float:
    out_digits = unravel(row, [c.shape[1] for c in cores])
    in_digits = unravel(col, [c.shape[2] for c in cores])
    product = torch.ones(1, 1)
    for core, o, i in zip(cores, out_digits, in_digits):
        product = product @ core[:, o, i, :]
    return float(product)


def test_cores_contract_to_the_entrywise_tensor_train_product():
    generator = torch.Generator().manual_seed(0)
    shapes = [(1, 3, 2, 4), (4, 2, 5, 3), (3, 4, 2, 1)]
    cores = [torch.randn(shape, generator=generator) for shape in shapes]
    matrix = tt_to_matrix(cores)
    assert matrix.shape == (3 * 2 * 4, 2 * 5 * 2)
    expected = torch.tensor([[naive_tt_entry(cores, r, c) for c in range(20)] for r in range(24)])
    torch.testing.assert_close(matrix, expected, atol=1e-5, rtol=1e-5)


def test_layer_update_is_the_tensor_train_and_merges():
    model = tiny_gpt2()
    add_adapter(model, LorettaConfig(tt_rank=3, num_cores=3, alpha=2.0, target_modules=["c_fc"]))
    perturb_trainable(model, scale=0.3)
    layer = model.transformer.h[0].mlp.c_fc  # Conv1D 32 -> 128
    adapter = layer.adapters["default"]
    cores = [c.detach() for c in adapter.loretta_cores]
    delta = 2.0 * torch.tensor([[naive_tt_entry(cores, r, c) for c in range(32)] for r in range(128)])
    x = torch.randn(2, 32)
    torch.testing.assert_close(layer(x), layer.base_layer(x) + x @ delta.T, atol=1e-5, rtol=0)
    weight = layer.base_layer.weight.detach().clone()
    merge_adapters(model)
    torch.testing.assert_close(layer.base_layer.weight.detach(), weight + delta.T, atol=1e-5, rtol=0)


def test_parameter_count_formula():
    model = tiny_llama()
    add_adapter(model, LorettaConfig(tt_rank=4, num_cores=3, target_modules=["q_proj", "up_proj"]))
    # q_proj 32 -> 32: out (4, 4, 2), in (4, 4, 2); up_proj 32 -> 64: out (4, 4, 4), in (4, 4, 2)
    assert balanced_factors(32, 3) == [4, 4, 2] and balanced_factors(64, 3) == [4, 4, 4]
    ranks = [1, 4, 4, 1]

    def count(out_f, in_f):
        return sum(ranks[k] * out_f[k] * in_f[k] * ranks[k + 1] for k in range(3))

    per_layer = count([4, 4, 2], [4, 4, 2]) + count([4, 4, 4], [4, 4, 2])
    assert per_layer == (64 + 256 + 16) + (64 + 256 + 32)
    assert trainable_parameters(model)[0] == 2 * per_layer
    assert 2 * per_layer < 2 * 4 * ((32 + 32) + (32 + 64)) * 2  # below a rank-8 LoRA on the same layers


def test_balanced_factors_multiply_back_and_stay_close():
    for n, parts in [(4096, 3), (11008, 3), (96, 2), (7, 3), (1, 2)]:
        factors = balanced_factors(n, parts)
        assert len(factors) == parts and math.prod(factors) == n
    assert balanced_factors(4096, 3) == [16, 16, 16]
    assert balanced_factors(7, 3) == [7, 1, 1]


def test_identity_at_init_comes_from_the_zero_last_core():
    model = tiny_llama()
    add_adapter(model, LorettaConfig(target_modules=["o_proj"]))
    adapter = model.model.layers[0].self_attn.o_proj.adapters["default"]
    assert torch.count_nonzero(adapter.loretta_cores[-1]) == 0
    assert all(torch.count_nonzero(core) > 0 for core in list(adapter.loretta_cores)[:-1])
