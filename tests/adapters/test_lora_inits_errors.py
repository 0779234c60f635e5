"""Bad input to the LoRA initialisations gets a clear message naming the value and what to do."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_models import sample_ids, tiny_llama

from tuneforge.adapters import LoraConfig, add_adapter
from tuneforge.adapters.lora.inits import export_as_plain_lora, initialize_lora
from tuneforge.config import parse_train_config
from tuneforge.errors import AdapterError, ConfigError, DataError


def train_config(adapter: dict):
    return parse_train_config({"adapter": adapter, "data": {"train": "arithmetic"}})


@pytest.mark.parametrize("batches", [None, []])
@pytest.mark.parametrize("init", ["corda", "lora-ga", "eva"])
def test_data_driven_init_without_batches(init, batches):
    model = tiny_llama()
    add_adapter(model, LoraConfig(r=4, init=init, target_modules=["q_proj"]), "mine")
    with pytest.raises(ConfigError, match=rf"adapter 'mine' uses init={init}, which is computed from calibration "
                                          r"data, but no batches were given.*initialize_lora.*init_batches"):
        initialize_lora(model, "mine", batches)


def test_calibration_batch_without_input_ids():
    model = tiny_llama()
    add_adapter(model, LoraConfig(r=4, init="eva", target_modules=["q_proj"]))
    with pytest.raises(DataError, match=r"calibration batch 1 for init=eva must be a dict with 'input_ids'; got \['ids'\]"):
        initialize_lora(model, "default", [{"input_ids": sample_ids()}, {"ids": sample_ids()}])


def test_initialize_unknown_adapter():
    model = tiny_llama()
    with pytest.raises(AdapterError, match="no adapter named 'x' to initialise"):
        initialize_lora(model, "x", [{"input_ids": sample_ids()}])


def test_data_free_init_needs_no_batches():
    model = tiny_llama()
    add_adapter(model, LoraConfig(r=4, init="pissa", target_modules=["q_proj"]))
    initialize_lora(model, "default", None)  # nothing to do, and no error


@pytest.mark.parametrize("value", [0, -3])
def test_pissa_niter_below_one(value):
    with pytest.raises(ConfigError, match=rf"adapter.pissa_niter={value}: Input should be greater than or equal to 1"):
        train_config({"init": "pissa", "pissa_niter": value})
    with pytest.raises(ConfigError, match=r"x.json: invalid LoraConfig:\n  pissa_niter: Input should be greater"):
        LoraConfig.from_peft_dict({"init_lora_weights": f"pissa_niter_{value}"}, source="x.json")


def test_invalid_corda_mode_lists_the_choices():
    with pytest.raises(ConfigError, match=r"adapter.corda_mode='ipm': allowed values are 'instruction-previewed' "
                                          r"or 'knowledge-preserved'"):
        train_config({"init": "corda", "corda_mode": "ipm"})


def test_unknown_init_lists_the_choices():
    with pytest.raises(ConfigError, match=r"init: Input should be 'kaiming', 'gaussian', 'pissa', 'olora', 'corda', "
                                          r"'lora-ga', 'eva' or 'loftq' \(got 'orthogonal'\)"):
        LoraConfig.from_peft_dict({"init_lora_weights": "orthogonal"}, source="adapter_config.json")


def test_loftq_bits_other_than_four():
    with pytest.raises(ConfigError, match=r"adapter.loftq_bits=8: allowed values are 4"):
        train_config({"init": "loftq", "loftq_bits": 8})


@pytest.mark.parametrize("init", ["pissa", "olora", "corda", "loftq"])
def test_rank_above_layer_dims(init):
    with pytest.raises(AdapterError, match=r"rank r=20 for 'model.layers.0.self_attn.k_proj' exceeds .* 16x32"):
        add_adapter(tiny_llama(), LoraConfig(r=20, init=init, target_modules=["k_proj"]))


def test_lora_ga_needs_two_r_directions():
    with pytest.raises(AdapterError, match=r"init=lora-ga uses the top 2r=24 singular directions .*"
                                           r"'model.layers.0.self_attn.k_proj'.* 16x32; lower r to at most 8"):
        add_adapter(tiny_llama(), LoraConfig(r=12, init="lora-ga", target_modules=["k_proj"]))


def test_loftq_on_an_embedding():
    model = tiny_llama()
    with pytest.raises(AdapterError, match=r"init=loftq cannot be applied to the Embedding 'model.embed_tokens': "
                                           r"LoftQ quantizes Linear weights.*exclude_modules"):
        add_adapter(model, LoraConfig(r=4, init="loftq", target_modules=["embed_tokens"]))
    assert torch.equal(model.model.embed_tokens.weight, tiny_llama().model.embed_tokens.weight)


def test_pissa_on_an_embedding():
    with pytest.raises(AdapterError, match=r"init=pissa cannot be applied to the Embedding 'model.embed_tokens'"):
        add_adapter(tiny_llama(), LoraConfig(r=4, init="pissa", target_modules=["embed_tokens"]))


def test_init_with_dora():
    with pytest.raises(ConfigError, match=r"init=olora with use_dora=true is not supported"):
        add_adapter(tiny_llama(), LoraConfig(r=4, init="olora", use_dora=True, target_modules=["q_proj"]))


@pytest.mark.parametrize("init", ["loftq", "lora-ga"])
def test_weight_inits_on_a_quantized_base(init):
    from tuneforge.quant.model import quantize_model

    model = quantize_model(tiny_llama(), compute_dtype=torch.float32)
    with pytest.raises(AdapterError, match=rf"init={init} on 'model.layers.0.self_attn.q_proj' needs the "
                                           r"full-precision weight, but the layer is already quantized \(nf4\)"):
        add_adapter(model, LoraConfig(r=4, init=init, target_modules=["q_proj"]))


def test_export_refuses_loftq_and_plain_adapters(tmp_path):
    model = copy.deepcopy(tiny_llama())
    add_adapter(model, LoraConfig(r=4, init="loftq", target_modules=["q_proj"]), "quantized")
    with pytest.raises(AdapterError, match=r"adapter 'quantized' is method=lora, init=loftq\. LoftQ's base is the "
                                           r"quantized Q"):
        export_as_plain_lora(model, "quantized", tmp_path)
    add_adapter(model, LoraConfig(r=4, target_modules=["q_proj"]), "plain")
    with pytest.raises(AdapterError, match=r"init=kaiming\. Its base weights are unchanged: save_adapter"):
        export_as_plain_lora(model, "plain", tmp_path)
    with pytest.raises(AdapterError, match=r"no adapter named 'other' to export"):
        export_as_plain_lora(model, "other", tmp_path)
    assert not any(tmp_path.iterdir())


def test_export_before_calibration(tmp_path):
    model = tiny_llama()
    add_adapter(model, LoraConfig(r=4, init="corda", target_modules=["q_proj"]))
    with pytest.raises(AdapterError, match=r"init 'corda' .* needs calibration data and has not seen any"):
        export_as_plain_lora(model, "default", tmp_path)
