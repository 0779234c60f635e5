"""LoRETTA_rep: ΔW = (alpha/r)·B A with A and B each a tensor train, against entry-by-entry products and
the paper's parameter count Σ_k r_{k-1} n_k r_k."""

from __future__ import annotations

import math

import torch
from tiny_models import perturb_trainable, tiny_gpt2, tiny_llama

from tuneforge.adapters import add_adapter, merge_adapters, trainable_parameters
from tuneforge.adapters.sharing.loretta import LorettaConfig, LorettaLinear, balanced_factors, tt_to_tensor


def unravel(index: int, factors: list[int]) -> list[int]:
    """Row-major digits of ``index`` in the mixed radix ``factors``."""
    digits = []
    for size in reversed(factors):
        digits.append(index % size)
        index //= size
    return digits[::-1]


def naive_tt_entry(cores, index: int) -> float:
    product = torch.ones(1, 1)
    for core, digit in zip(cores, unravel(index, [c.shape[1] for c in cores])):
        product = product @ core[:, digit, :]
    return float(product)


def naive_matrix(cores, rows: int, cols: int) -> torch.Tensor:
    """The tensor train's entries in row-major order, reshaped to (rows, cols)."""
    return torch.tensor([naive_tt_entry(cores, index) for index in range(rows * cols)]).reshape(rows, cols)


def paper_parameter_count(shape: list[int], tt_rank: int) -> int:
    """Σ_k r_{k-1} n_k r_k with r_0 = r_d = 1 (the tensor-train format's size)."""
    ranks = [1] + [tt_rank] * (len(shape) - 1) + [1]
    return sum(ranks[k] * shape[k] * ranks[k + 1] for k in range(len(shape)))


def test_cores_contract_to_the_entrywise_tensor_train_product():
    generator = torch.Generator().manual_seed(0)
    shapes = [(1, 3, 4), (4, 2, 3), (3, 5, 1)]
    cores = [torch.randn(shape, generator=generator) for shape in shapes]
    flat = tt_to_tensor(cores)
    assert flat.shape == (3 * 2 * 5,)
    expected = torch.tensor([naive_tt_entry(cores, index) for index in range(30)])
    torch.testing.assert_close(flat, expected, atol=1e-5, rtol=1e-5)


def test_layer_update_is_alpha_over_r_times_the_two_tensor_train_factors_and_merges():
    model = tiny_gpt2()
    add_adapter(model, LorettaConfig(r=4, alpha=8.0, tt_rank=3, num_cores=3, target_modules=["c_fc"]))
    perturb_trainable(model, scale=0.3)
    layer = model.transformer.h[0].mlp.c_fc  # Conv1D 32 -> 128
    adapter = layer.adapters["default"]
    down = naive_matrix([c.detach() for c in adapter.loretta_A.cores], 32, 4)  # A: (in, r), row-major
    up = naive_matrix([c.detach() for c in adapter.loretta_B.cores], 4, 128)  # B: (r, out)
    x = torch.randn(2, 32)
    expected = layer.base_layer(x) + (8.0 / 4) * (x @ down @ up)
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=0)
    weight = layer.base_layer.weight.detach().clone()  # Conv1D stores (in, out)
    merge_adapters(model)
    torch.testing.assert_close(layer.base_layer.weight.detach(), weight + 2.0 * down @ up, atol=1e-5, rtol=0)


def test_parameter_count_follows_the_papers_formula():
    model = tiny_llama()
    add_adapter(model, LorettaConfig(r=8, tt_rank=5, num_cores=4, target_modules=["q_proj", "up_proj"]))
    # q_proj 32 -> 32: A and B hold 256 entries each; up_proj 32 -> 64: A 256, B 512.
    assert balanced_factors(256, 4) == [4, 4, 4, 4] and balanced_factors(512, 4) == [8, 4, 4, 4]
    q_proj = 2 * paper_parameter_count([4, 4, 4, 4], 5)
    up_proj = paper_parameter_count([4, 4, 4, 4], 5) + paper_parameter_count([8, 4, 4, 4], 5)
    assert (q_proj, up_proj) == (2 * (20 + 100 + 100 + 20), (20 + 100 + 100 + 20) + (40 + 100 + 100 + 20))
    assert trainable_parameters(model)[0] == 2 * (q_proj + up_proj)  # two decoder layers


def test_a_hidden_768_layer_trains_about_a_twelfth_of_loras_parameters():
    """The paper's BERT/DeBERTa-base setting: rank 8, tensor rank 5 on a 768 x 768 projection."""
    adapter = LorettaLinear(768, 768, LorettaConfig(r=8, tt_rank=5, num_cores=4), transposed=False)
    assert adapter.loretta_A.shape == balanced_factors(768 * 8, 4) == [12, 8, 8, 8]
    count = sum(p.numel() for p in adapter.parameters())
    assert count == 2 * paper_parameter_count([12, 8, 8, 8], 5) == 1000
    # The official code's table shape for 768 at rank 8, (8, 8, 12, 8), gives 1,160 by the same formula.
    assert paper_parameter_count([8, 8, 12, 8], 5) * 2 == 1160
    assert 8 * (768 + 768) / count > 12  # LoRA's r(in + out) = 12,288


def test_init_is_identity_with_factor_entries_at_the_official_scale():
    torch.manual_seed(0)
    adapter = LorettaLinear(768, 768, LorettaConfig(r=8, tt_rank=5, num_cores=4), transposed=False)
    assert torch.count_nonzero(adapter.loretta_B.cores[-1]) == 0
    assert torch.count_nonzero(adapter.delta_weight(None)) == 0
    down = adapter.loretta_A.matrix().detach()
    target = 1 / math.sqrt(768 + 768)
    assert 0.7 * target < float(down.std()) < 1.3 * target


def test_balanced_factors_multiply_back_and_stay_close():
    for n, parts in [(4096, 3), (11008, 3), (96, 2), (7, 3), (1, 2)]:
        factors = balanced_factors(n, parts)
        assert len(factors) == parts and math.prod(factors) == n
    assert balanced_factors(4096, 3) == [16, 16, 16]
    assert balanced_factors(7, 3) == [7, 1, 1]
