"""VeRA: the shared projections, the per-layer formula, parameter counts, and files both ways with peft."""

from __future__ import annotations

import copy

import peft
import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_models import perturb_trainable, sample_ids, tiny_gpt2, tiny_llama

from tuneforge.adapters import AdaptedLayer, add_adapter, load_adapter, save_adapter, trainable_parameters
from tuneforge.adapters.sharing.vera import VeraConfig
from tuneforge.errors import AdapterError

INTEROP = [
    ("llama", tiny_llama, dict(r=4, target_modules=["q_proj", "v_proj", "down_proj"])),
    ("llama-regenerated", tiny_llama, dict(r=8, save_projection=False, target_modules=["k_proj", "gate_proj"])),
    ("gpt2-conv1d", tiny_gpt2, dict(r=4, target_modules=["c_attn", "c_fc"])),
    # r above k_proj's 16 outputs: allowed, as in the paper and PEFT (each direction adds a trainable λ_d)
    ("llama-r-above-layer-size", tiny_llama, dict(r=40, target_modules=["k_proj"])),
]
PEFT_NAMES = {"dropout": "vera_dropout"}


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def peft_config(make_model, kwargs) -> peft.VeraConfig:
    extra = {"fan_in_fan_out": True} if make_model is tiny_gpt2 else {}
    return peft.VeraConfig(**{PEFT_NAMES.get(k, k): v for k, v in kwargs.items()}, **extra)


def vera_layers(model):
    return [m.adapters["default"] for m in model.modules() if isinstance(m, AdaptedLayer)]


def test_output_matches_the_formula_and_layers_share_one_projection():
    model = tiny_llama()
    add_adapter(model, VeraConfig(r=4, target_modules=["q_proj", "down_proj"]))
    perturb_trainable(model)
    layers = vera_layers(model)
    assert len({id(layer.projections) for layer in layers}) == 1
    vera_A, vera_B = layers[0].projections.matrices(torch.device("cpu"))
    assert vera_A.shape == (4, 64) and vera_B.shape == (32, 4)  # largest in (down_proj) and out
    down = model.model.layers[0].mlp.down_proj
    layer = down.adapters["default"]
    x = torch.randn(3, 64)
    a, b = vera_A[:, :64], vera_B[:32]
    expected = down.base_layer(x) + layer.vera_lambda_b * ((layer.vera_lambda_d * (x @ a.T)) @ b.T)
    torch.testing.assert_close(down(x), expected, atol=1e-6, rtol=0)


def test_stored_parameter_count_is_r_plus_out_per_layer(tmp_path):
    model = tiny_llama()
    config = VeraConfig(r=4, target_modules=["q_proj", "k_proj", "down_proj"], save_projection=False)
    add_adapter(model, config)
    # q_proj: out 32, k_proj: out 16 (2 kv heads x 8), down_proj: out 32; two decoder layers
    expected = 2 * ((4 + 32) + (4 + 16) + (4 + 32))
    assert trainable_parameters(model)[0] == expected
    save_adapter(model, tmp_path)
    stored = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert sum(t.numel() for t in stored.values()) == expected
    assert not any("vera_A" in key for key in stored)


def test_projections_are_peft_draws_from_the_key():
    base = tiny_llama()
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.VeraConfig(r=8, projection_prng_key=7,
                                                                     target_modules=["k_proj", "up_proj"]))
    ours = copy.deepcopy(base)
    add_adapter(ours, VeraConfig(r=8, projection_prng_key=7, target_modules=["k_proj", "up_proj"]))
    ours(sample_ids())
    projections = vera_layers(ours)[0].projections
    torch.testing.assert_close(projections.vera_A, theirs.base_model.vera_A["default"], atol=0, rtol=0)
    torch.testing.assert_close(projections.vera_B, theirs.base_model.vera_B["default"], atol=0, rtol=0)


def test_each_adapter_gets_its_own_projections_even_from_one_config():
    model = tiny_llama()
    config = VeraConfig(r=4, projection_prng_key=1, target_modules=["q_proj"])
    add_adapter(model, config, "first")
    add_adapter(model, config, "second")
    layer = model.model.layers[0].self_attn.q_proj
    assert layer.adapters["first"].projections is not layer.adapters["second"].projections


@pytest.mark.parametrize("case_id,make_model,kwargs", INTEROP, ids=[c[0] for c in INTEROP])
def test_tuneforge_vera_loads_in_peft(case_id, make_model, kwargs, tmp_path):
    base = make_model()
    model = copy.deepcopy(base)
    add_adapter(model, VeraConfig(**kwargs))
    perturb_trainable(model)
    ids = sample_ids()
    save_adapter(model, tmp_path)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    diff = (logits(theirs, ids) - logits(model, ids)).abs().max().item()
    assert diff <= 1e-5, f"peft's logits differ by {diff}"


@pytest.mark.parametrize("case_id,make_model,kwargs", INTEROP, ids=[c[0] for c in INTEROP])
def test_peft_vera_loads_in_tuneforge(case_id, make_model, kwargs, tmp_path):
    base = make_model()
    theirs = peft.get_peft_model(copy.deepcopy(base), peft_config(make_model, kwargs))
    perturb_trainable(theirs)
    theirs.eval()
    ids = sample_ids()
    expected = logits(theirs, ids)
    theirs.save_pretrained(tmp_path)
    model = copy.deepcopy(base)
    load_adapter(model, tmp_path)
    diff = (logits(model, ids) - expected).abs().max().item()
    assert diff <= 1e-5, f"tuneforge's logits differ from peft's by {diff}"


def test_file_missing_its_projections_is_refused(tmp_path):
    base = tiny_llama()
    model = copy.deepcopy(base)
    add_adapter(model, VeraConfig(r=4, target_modules=["q_proj"]))
    save_adapter(model, tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    tensors = {k: v for k, v in load_file(str(path)).items() if "vera_A" not in k and "vera_B" not in k}
    save_file(tensors, str(path))
    with pytest.raises(AdapterError, match="no 'base_model.vera_A'.*save_projection=false"):
        load_adapter(copy.deepcopy(base), tmp_path)


def test_projections_too_small_for_the_model_are_refused(tmp_path):
    base = tiny_llama()
    model = copy.deepcopy(base)
    add_adapter(model, VeraConfig(r=4, target_modules=["up_proj"]))  # out 64 needs vera_B of 64 rows
    save_adapter(model, tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    tensors = load_file(str(path))
    tensors["base_model.vera_B"] = tensors["base_model.vera_B"][:32].contiguous()
    save_file(tensors, str(path))
    with pytest.raises(AdapterError, match=r"VeRA projections .*\(32, 4\).* do not fit this model.*\(>=64, 4\)"):
        load_adapter(copy.deepcopy(base), tmp_path)
