"""BOFT: the butterfly product against a naive construction, orthogonality, errors, peft both ways."""

from __future__ import annotations

import copy
import warnings

import peft
import pytest
import torch
from tiny_models import perturb_trainable, sample_ids, tiny_llama
from peft_roundtrip import assert_peft_loads_ours

from tuneforge.adapters import add_adapter, load_adapter, merge_adapters, unmerge_adapters
from tuneforge.adapters.orthogonal.boft import BoftConfig, BoftLinear, butterfly_permutation
from tuneforge.errors import AdapterError

Q_PROJ = "model.layers.0.self_attn.q_proj"


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def naive_permutation_matrix(features: int, block_size: int, factor: int) -> torch.Tensor:
    """Written out from the definition: inside each chunk of b·2^i features, groups of b/2 in the
    order (even groups, then odd groups)."""
    chunk, half = block_size * 2**factor, block_size // 2
    order = []
    for start in range(0, features, chunk):
        groups = list(range(chunk // half))
        for g in groups[0::2] + groups[1::2]:
            order.extend(start + g * half + k for k in range(half))
    matrix = torch.zeros(features, features)
    for row, column in enumerate(order):
        matrix[row, column] = 1
    return matrix


def test_permutation_examples():
    assert butterfly_permutation(8, 2, 1).tolist() == [0, 2, 1, 3, 4, 6, 5, 7]
    assert butterfly_permutation(8, 4, 0).tolist() == list(range(8))
    assert butterfly_permutation(8, 2, 2).tolist() == [0, 2, 4, 6, 1, 3, 5, 7]


def test_butterfly_matrix_is_orthogonal_and_equals_the_naive_product():
    model = tiny_llama()
    add_adapter(model, BoftConfig(boft_block_size=4, boft_n_butterfly_factor=3, target_modules=["q_proj"]))
    perturb_trainable(model, scale=0.3)
    layer: BoftLinear = model.get_submodule(Q_PROJ).adapters["default"]
    butterfly = layer.butterfly_matrix().detach()
    torch.testing.assert_close(butterfly @ butterfly.T, torch.eye(32), atol=1e-5, rtol=0)
    expected = torch.eye(32)
    for i in range(3):
        skew = 0.5 * (layer.boft_R[i] - layer.boft_R[i].transpose(-1, -2)).detach()
        blocks = [torch.linalg.inv(torch.eye(4) + s) @ (torch.eye(4) - s) for s in skew]
        perm = naive_permutation_matrix(32, 4, i)
        expected = perm @ torch.block_diag(*blocks) @ perm.T @ expected
    torch.testing.assert_close(butterfly, expected, atol=1e-5, rtol=0)
    # The layer computes s ⊙ (W Bᵀ x) + bias.
    x = torch.randn(3, 32)
    weight = model.get_submodule(Q_PROJ).base_layer.weight
    with torch.no_grad():
        out = model.get_submodule(Q_PROJ)(x)
        torch.testing.assert_close(out, layer.boft_s[:, 0] * (x @ expected @ weight.T), atol=1e-5, rtol=0)


def test_merge_with_several_factors_is_exact():
    base = tiny_llama()
    model = copy.deepcopy(base)
    add_adapter(model, BoftConfig(boft_block_num=4, boft_n_butterfly_factor=2, target_modules=["q_proj", "down_proj"]))
    perturb_trainable(model, scale=0.2)
    ids = sample_ids()
    expected = logits(model, ids)
    merge_adapters(model, safe=True)
    torch.testing.assert_close(logits(model, ids), expected, atol=1e-5, rtol=1e-4)
    unmerge_adapters(model)
    torch.testing.assert_close(model.get_submodule(Q_PROJ).base_layer.weight,
                               base.get_submodule(Q_PROJ).weight, atol=1e-6, rtol=0)


def test_bad_block_sizes_name_the_valid_ones():
    valid = r"\[1, 2, 4, 8, 16, 32\]"
    with pytest.raises(AdapterError, match=r"boft_block_size=3 does not divide in_features=32 .*" + valid):
        add_adapter(tiny_llama(), BoftConfig(boft_block_size=3, target_modules=["q_proj"]))
    with pytest.raises(AdapterError, match=r"boft_n_butterfly_factor=3 .* Valid block sizes: \[2, 4, 8\]"):
        add_adapter(tiny_llama(), BoftConfig(boft_block_size=16, boft_n_butterfly_factor=3, target_modules=["q_proj"]))


# peft 0.21.2 falls back to a single butterfly factor without its CUDA extension, so interop on a
# CPU is tested with one factor; several factors are checked against the naive product above.
INTEROP = [
    ("block-size", dict(boft_block_size=4, target_modules=["q_proj", "v_proj", "down_proj"])),
    ("block-num", dict(boft_block_num=4, boft_block_size=0, target_modules=["q_proj", "up_proj"])),
]


@pytest.mark.parametrize("case_id,kwargs", INTEROP, ids=[c[0] for c in INTEROP])
def test_tuneforge_boft_loads_in_peft(case_id, kwargs, tmp_path):
    assert_peft_loads_ours(tiny_llama(), BoftConfig(**kwargs), tmp_path)


@pytest.mark.parametrize("case_id,kwargs", INTEROP, ids=[c[0] for c in INTEROP])
def test_peft_boft_loads_in_tuneforge(case_id, kwargs, tmp_path):
    base = tiny_llama()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(copy.deepcopy(base), peft.BOFTConfig(**kwargs))
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


def test_peft_file_with_fewer_factors_than_its_config_gets_a_clear_error(tmp_path):
    base = tiny_llama()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(copy.deepcopy(base), peft.BOFTConfig(
            boft_block_size=4, boft_n_butterfly_factor=2, target_modules=["q_proj"]))
    if theirs.base_model.model.model.layers[0].self_attn.q_proj.boft_R["default"].shape[0] != 1:
        pytest.skip("peft's CUDA extension is available here")
    theirs.save_pretrained(tmp_path)
    with pytest.raises(AdapterError, match="set \"boft_n_butterfly_factor\": 1"):
        load_adapter(copy.deepcopy(base), tmp_path)
