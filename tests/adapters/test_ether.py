"""ETHER / ETHER+: reflection properties, the layer against a naive formula (Conv1D with bias), merging."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_models import perturb_trainable, sample_ids, tiny_gpt2, tiny_llama

from tuneforge.adapters import add_adapter, merge_adapters, unmerge_adapters
from tuneforge.adapters.orthogonal.ether import EtherConfig, EtherLinear, block_matrix
from tuneforge.errors import AdapterError

C_ATTN = "transformer.h.0.attn.c_attn"


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_ether_block_reflection_is_involutive_and_orthogonal():
    u = torch.randn(3, 5, generator=torch.Generator().manual_seed(0))
    h = block_matrix(u, None)
    eye = torch.eye(15)
    torch.testing.assert_close(h @ h, eye, atol=1e-5, rtol=0)
    torch.testing.assert_close(h @ h.T, eye, atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.linalg.matrix_norm(h - eye), torch.tensor(2.0 * 3**0.5))  # 2 per block
    unit = u[1] / u[1].norm()
    torch.testing.assert_close(h[5:10, 5:10], torch.eye(5) - 2 * torch.outer(unit, unit))
    assert torch.count_nonzero(h[:5, 5:]) == 0


@pytest.mark.parametrize("plus", [False, True], ids=["ether", "ether-plus"])
def test_layer_matches_the_naive_formula_on_conv1d_with_bias(plus):
    model = tiny_gpt2()
    add_adapter(model, EtherConfig(nb=4, plus=plus, target_modules=["c_attn"]))
    perturb_trainable(model, scale=0.3)
    wrapped = model.get_submodule(C_ATTN)
    layer: EtherLinear = wrapped.adapters["default"]
    weight = wrapped.base_layer.weight.T  # Conv1D stores (in, out)
    bias = wrapped.base_layer.bias
    left = block_matrix(layer.ether_u, layer.ether_v if plus else None).detach()
    right = block_matrix(layer.ether_u_input, layer.ether_v_input).detach() if plus else torch.eye(32)
    x = torch.randn(2, 3, 32)
    with torch.no_grad():
        torch.testing.assert_close(wrapped(x), x @ (left @ weight @ right).T + bias, atol=1e-5, rtol=0)


def test_ether_plus_starts_at_identity_and_ether_does_not():
    ids = sample_ids()
    base = tiny_llama()
    plus = copy.deepcopy(base)
    add_adapter(plus, EtherConfig(nb=2, plus=True, target_modules=["q_proj", "down_proj"]))
    torch.testing.assert_close(logits(plus, ids), logits(base, ids), atol=1e-5, rtol=0)
    plain = copy.deepcopy(base)
    add_adapter(plain, EtherConfig(nb=2, target_modules=["q_proj", "down_proj"]))
    assert (logits(plain, ids) - logits(base, ids)).abs().max() > 1e-4


@pytest.mark.parametrize("plus", [False, True], ids=["ether", "ether-plus"])
def test_merge_and_unmerge_are_exact(plus):
    base = tiny_gpt2()
    model = copy.deepcopy(base)
    add_adapter(model, EtherConfig(nb=2, plus=plus, target_modules=["c_attn", "c_fc"]))
    perturb_trainable(model, scale=0.2)
    ids = sample_ids()
    expected = logits(model, ids)
    merge_adapters(model, safe=True)
    torch.testing.assert_close(logits(model, ids), expected, atol=1e-5, rtol=1e-4)
    unmerge_adapters(model)
    torch.testing.assert_close(model.get_submodule(C_ATTN).base_layer.weight,
                               base.get_submodule(C_ATTN).weight, atol=1e-5, rtol=0)


def test_block_count_must_divide_the_layer():
    with pytest.raises(AdapterError, match=r"nb=5 does not divide out_features=32 .*\[1, 2, 4, 8, 16, 32\]"):
        add_adapter(tiny_llama(), EtherConfig(nb=5, target_modules=["q_proj"]))
    with pytest.raises(AdapterError, match=r"nb=64 does not divide in_features=32"):
        add_adapter(tiny_llama(), EtherConfig(nb=64, plus=True, target_modules=["up_proj"]))
