"""OFT: orthogonality of the Cayley blocks, merge, bad block sizes, and peft 0.21 as an oracle both ways."""

from __future__ import annotations

import copy
import warnings

import peft
import pytest
import torch
from tiny_models import perturb_trainable, sample_ids, tiny_llama
from peft_roundtrip import assert_peft_loads_ours

from tuneforge.adapters import add_adapter, load_adapter, merge_adapters, unmerge_adapters
from tuneforge.adapters.orthogonal.oft import OftConfig, OftLinear, cayley, cayley_neumann, skew_from_upper
from tuneforge.errors import AdapterError, ConfigError


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def oft_layer(model, path="model.layers.0.self_attn.q_proj", name="default") -> OftLinear:
    return model.get_submodule(path).adapters[name]


def test_cayley_blocks_are_orthogonal_and_match_the_formula():
    torch.manual_seed(0)
    packed = torch.randn(3, 6) * 0.5  # three 4x4 blocks
    q = skew_from_upper(packed, 4)
    assert torch.equal(q, -q.transpose(-1, -2))
    assert q[0, 0, 1] == packed[0, 0] and q[0, 2, 3] == packed[0, 5]  # row-major strict upper triangle
    r = cayley(q)
    eye = torch.eye(4).expand(3, 4, 4)
    torch.testing.assert_close(r @ r.transpose(-1, -2), eye, atol=1e-5, rtol=0)
    naive = torch.stack([(torch.eye(4) - b) @ torch.linalg.inv(torch.eye(4) + b) for b in q])
    torch.testing.assert_close(r, naive, atol=1e-5, rtol=0)


def test_neumann_series_approximates_the_cayley_transform_of_minus_q():
    q = skew_from_upper(torch.randn(2, 3, generator=torch.Generator().manual_seed(1)) * 0.01, 3)
    torch.testing.assert_close(cayley_neumann(q, 8), cayley(-q), atol=1e-6, rtol=0)
    torch.testing.assert_close(cayley_neumann(q, 2), torch.eye(3) + 2 * q)


def test_trained_multiplier_is_orthogonal_and_merge_is_exact():
    base = tiny_llama()
    model = copy.deepcopy(base)
    add_adapter(model, OftConfig(oft_block_size=8, target_modules=["q_proj", "down_proj"]))
    perturb_trainable(model, scale=0.3)
    layer = oft_layer(model)
    rotation = layer.input_matrix().detach()
    torch.testing.assert_close(rotation @ rotation.T, torch.eye(32), atol=1e-5, rtol=0)
    ids = sample_ids()
    expected = logits(model, ids)
    merge_adapters(model)
    torch.testing.assert_close(logits(model, ids), expected, atol=1e-5, rtol=1e-4)
    weight = base.get_submodule("model.layers.0.self_attn.q_proj").weight
    merged = model.get_submodule("model.layers.0.self_attn.q_proj").base_layer.weight
    torch.testing.assert_close(merged, weight @ rotation, atol=1e-6, rtol=0)
    unmerge_adapters(model)
    torch.testing.assert_close(model.get_submodule("model.layers.0.self_attn.q_proj").base_layer.weight, weight,
                               atol=1e-6, rtol=0)


def test_coft_bounds_each_block():
    model = tiny_llama()
    add_adapter(model, OftConfig(r=4, coft=True, eps=1e-3, target_modules=["q_proj"]))
    perturb_trainable(model, scale=1.0)
    layer = oft_layer(model)
    q = skew_from_upper(layer.constrained(layer.oft_R), layer.block_size)
    assert (q.flatten(1).norm(dim=1) <= 1e-3 / 2 + 1e-9).all()  # eps / sqrt(4 blocks)


def test_block_size_that_does_not_divide_names_the_valid_ones():
    with pytest.raises(AdapterError, match=r"oft_block_size=5 does not divide in_features=32 .*\[1, 2, 4, 8, 16, 32\]"):
        add_adapter(tiny_llama(), OftConfig(oft_block_size=5, target_modules=["q_proj"]))
    with pytest.raises(ConfigError, match="exactly one of r"):
        from tuneforge.adapters.config import validate_config
        validate_config(OftConfig, {"r": 4, "oft_block_size": 8}, "test")


INTEROP = [
    ("block-size", dict(oft_block_size=8, target_modules=["q_proj", "v_proj", "down_proj"])),
    ("r", dict(r=4, oft_block_size=0, target_modules=["q_proj", "up_proj"])),
    ("neumann", dict(oft_block_size=8, use_cayley_neumann=True, target_modules=["q_proj", "o_proj"])),
    ("block-share", dict(oft_block_size=4, block_share=True, target_modules=["k_proj", "gate_proj"])),
    ("coft", dict(oft_block_size=8, coft=True, eps=2.0, target_modules=["q_proj"])),
]


@pytest.mark.parametrize("case_id,kwargs", INTEROP, ids=[c[0] for c in INTEROP])
def test_tuneforge_oft_loads_in_peft(case_id, kwargs, tmp_path):
    assert_peft_loads_ours(tiny_llama(), OftConfig(**kwargs), tmp_path)


@pytest.mark.parametrize("case_id,kwargs", INTEROP, ids=[c[0] for c in INTEROP])
def test_peft_oft_loads_in_tuneforge(case_id, kwargs, tmp_path):
    base = tiny_llama()
    settings = {"use_cayley_neumann": False, **kwargs}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(copy.deepcopy(base), peft.OFTConfig(**settings))
    perturb_trainable(theirs, scale=0.2)
    theirs.eval()
    ids = sample_ids()
    expected = logits(theirs, ids)
    theirs.save_pretrained(tmp_path)
    model = copy.deepcopy(base)
    load_adapter(model, tmp_path)
    diff = (logits(model, ids) - expected).abs().max().item()
    assert diff <= 1e-5, f"tuneforge's logits differ from peft's by {diff}"
    assert (expected - logits(base, ids)).abs().max() > 1e-3, "the adapter should change the output"


def multiplicative_configs():
    from tuneforge.adapters.orthogonal.boft import BoftConfig
    from tuneforge.adapters.orthogonal.ether import EtherConfig
    from tuneforge.adapters.orthogonal.hra import HraConfig

    return [OftConfig(oft_block_size=8, target_modules=["q_proj"]),
            BoftConfig(boft_block_size=4, boft_n_butterfly_factor=2, target_modules=["q_proj"]),
            HraConfig(r=4, target_modules=["q_proj"]),
            EtherConfig(nb=2, plus=True, target_modules=["q_proj"])]


@pytest.mark.parametrize("config", multiplicative_configs(), ids=lambda c: c.method)
def test_multiplicative_methods_run_on_a_quantized_base_and_refuse_to_merge(config):
    from tuneforge.quant import quantize_model

    model = quantize_model(tiny_llama(), bits=4, compute_dtype=torch.float32)
    add_adapter(model, config)
    perturb_trainable(model, scale=0.2)
    wrapped = model.get_submodule("model.layers.0.self_attn.q_proj")
    adapter = wrapped.adapters["default"]
    weight = wrapped.base_layer.weight.detach().float()  # dequantized on demand
    left = adapter.output_matrix()
    right = adapter.input_matrix()
    effective = adapter.multiplied(weight, None if left is None else left.detach(), right.detach())
    x = torch.randn(3, 32)
    with torch.no_grad():
        torch.testing.assert_close(wrapped(x), x @ effective.T, atol=1e-4, rtol=1e-4)
    codes = wrapped.base_layer.qweight.clone()
    with pytest.raises(AdapterError, match="cannot merge an adapter into a quantized base layer"):
        merge_adapters(model)
    assert torch.equal(wrapped.base_layer.qweight, codes)
