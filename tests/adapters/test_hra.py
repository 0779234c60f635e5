"""HRA: the reflection chain against a naive product, Gram-Schmidt, the regulariser, peft both ways."""

from __future__ import annotations

import copy
import warnings

import peft
import pytest
import torch
from tiny_models import perturb_trainable, sample_ids, tiny_llama
from peft_roundtrip import assert_peft_loads_ours

from tuneforge.adapters import add_adapter, load_adapter
from tuneforge.adapters.hooks import training_hooks
from tuneforge.adapters.orthogonal.hra import HraConfig, HraLinear
from tuneforge.errors import AdapterError

Q_PROJ = "model.layers.0.self_attn.q_proj"


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def hra_layer(model, path=Q_PROJ) -> HraLinear:
    return model.get_submodule(path).adapters["default"]


def naive_chain(u: torch.Tensor) -> torch.Tensor:
    result = torch.eye(u.shape[0])
    for column in u.T:
        unit = column / column.norm()
        result = result @ (torch.eye(u.shape[0]) - 2 * torch.outer(unit, unit))
    return result


def test_layer_equals_the_naive_reflection_product_and_starts_at_identity():
    model = tiny_llama()
    add_adapter(model, HraConfig(r=4, target_modules=["q_proj"]))
    layer = hra_layer(model)
    u = layer.hra_u.detach()
    assert torch.equal(u[:, 0], u[:, 1]) and torch.equal(u[:, 2], u[:, 3])  # paired init
    torch.testing.assert_close(layer.input_matrix().detach(), torch.eye(32), atol=1e-5, rtol=0)
    perturb_trainable(model, scale=0.3)
    u = layer.hra_u.detach()
    chain = naive_chain(u)
    torch.testing.assert_close(layer.input_matrix().detach(), chain, atol=1e-5, rtol=0)
    torch.testing.assert_close(chain @ chain.T, torch.eye(32), atol=1e-5, rtol=0)
    x = torch.randn(5, 32)
    weight = model.get_submodule(Q_PROJ).base_layer.weight
    with torch.no_grad():
        torch.testing.assert_close(model.get_submodule(Q_PROJ)(x), x @ (weight @ chain).T, atol=1e-5, rtol=0)


def test_gram_schmidt_gives_one_symmetric_reflection():
    model = tiny_llama()
    add_adapter(model, HraConfig(r=3, apply_GS=True, target_modules=["q_proj"]))
    layer = hra_layer(model)
    normals = layer.unit_normals().detach()
    torch.testing.assert_close(normals.T @ normals, torch.eye(3), atol=1e-5, rtol=0)
    matrix = layer.input_matrix().detach()
    torch.testing.assert_close(matrix, matrix.T)
    torch.testing.assert_close(matrix @ matrix, torch.eye(32), atol=1e-5, rtol=0)
    # With orthonormal normals the chain of reflections equals I - 2 Û Ûᵀ.
    torch.testing.assert_close(naive_chain(normals), matrix, atol=1e-5, rtol=0)


def test_orthogonality_regulariser_is_added_through_the_training_hooks():
    model = tiny_llama()
    add_adapter(model, HraConfig(r=2, orthogonality_weight=0.5, target_modules=["q_proj", "v_proj"]))
    perturb_trainable(model, scale=0.3)
    expected = 0.0
    for path in [Q_PROJ, "model.layers.0.self_attn.v_proj", "model.layers.1.self_attn.q_proj",
                 "model.layers.1.self_attn.v_proj"]:
        u = hra_layer(model, path).hra_u.detach()
        unit = u / u.norm(dim=0)
        expected += ((unit.T @ unit - torch.eye(2)) ** 2).sum().item()
    loss = training_hooks(model, "default").extra_loss(model)
    assert loss.requires_grad
    assert loss.item() == pytest.approx(0.5 * expected, rel=1e-5)
    plain = tiny_llama()
    add_adapter(plain, HraConfig(r=2, target_modules=["q_proj"]))
    assert training_hooks(plain, "default").extra_loss(plain) is None


def test_odd_rank_warns_and_too_large_rank_is_refused():
    with pytest.warns(UserWarning, match="odd r=3"):
        add_adapter(tiny_llama(), HraConfig(r=3, target_modules=["q_proj"]))
    with pytest.raises(AdapterError, match="r=40 for 'model.layers.0.self_attn.q_proj' exceeds in_features=32"):
        add_adapter(tiny_llama(), HraConfig(r=40, target_modules=["q_proj"]))


INTEROP = [
    ("chain", dict(r=4, target_modules=["q_proj", "v_proj", "down_proj"])),
    ("gram-schmidt", dict(r=4, apply_GS=True, target_modules=["q_proj", "up_proj"])),
]


@pytest.mark.parametrize("case_id,kwargs", INTEROP, ids=[c[0] for c in INTEROP])
def test_tuneforge_hra_loads_in_peft(case_id, kwargs, tmp_path):
    assert_peft_loads_ours(tiny_llama(), HraConfig(orthogonality_weight=1e-3, **kwargs), tmp_path)


@pytest.mark.parametrize("case_id,kwargs", INTEROP, ids=[c[0] for c in INTEROP])
def test_peft_hra_loads_in_tuneforge(case_id, kwargs, tmp_path):
    base = tiny_llama()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(copy.deepcopy(base), peft.HRAConfig(init_weights=False, **kwargs))
    perturb_trainable(theirs, scale=0.2)
    theirs.eval()
    ids = sample_ids()
    expected = logits(theirs, ids)
    theirs.save_pretrained(tmp_path)
    model = copy.deepcopy(base)
    load_adapter(model, tmp_path)
    diff = (logits(model, ids) - expected).abs().max().item()
    assert diff <= 1e-5, f"tuneforge's logits differ from peft's by {diff}"
    assert (expected - logits(base, ids)).abs().max() > 1e-3
