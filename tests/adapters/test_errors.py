"""Bad input gets a clear message that names the value and what to do."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from tiny_models import tiny_llama

from tuneforge.adapters import LoraConfig, add_adapter, load_adapter, save_adapter
from tuneforge.errors import AdapterError, ConfigError


def test_target_that_matches_nothing_lists_modules_and_suggests():
    model = tiny_llama()
    with pytest.raises(AdapterError) as err:
        add_adapter(model, LoraConfig(target_modules=["qproj"]))
    message = str(err.value)
    assert "matched no module of LlamaForCausalLM" in message
    assert "did you mean 'q_proj'" in message
    assert "v_proj (2)" in message  # what exists, with counts


def test_failed_add_leaves_model_untouched():
    model = tiny_llama()
    keys = set(model.state_dict())
    with pytest.raises(AdapterError):
        add_adapter(model, LoraConfig(target_modules=["q_proj"], modules_to_save=["nonexistent_head"]))
    assert set(model.state_dict()) == keys
    assert all(p.requires_grad for p in model.parameters())


def test_rank_larger_than_layer_allows():
    model = tiny_llama()  # k_proj is 32 -> 16
    with pytest.raises(AdapterError, match=r"rank r=20 for 'model.layers.0.self_attn.k_proj' exceeds .* 16x32"):
        add_adapter(model, LoraConfig(r=20, target_modules=["k_proj"]))


def test_target_of_unsupported_type_suggests_sub_layers():
    with pytest.raises(AdapterError, match=r"is a LlamaAttention.*self_attn.q_proj"):
        add_adapter(tiny_llama(), LoraConfig(target_modules=["self_attn"]))


def test_bad_config_values_are_reported_together():
    with pytest.raises(ConfigError) as err:
        LoraConfig.from_peft_dict({"r": -1, "lora_dropout": 2.0, "target_modules": ["q_proj"]}, source="x.json")
    assert "r: Input should be greater than 0" in str(err.value)
    assert "dropout" in str(err.value) and "x.json" in str(err.value)


def _saved(tmp_path, **kwargs):
    model = copy.deepcopy(tiny_llama())
    add_adapter(model, LoraConfig(**kwargs))
    save_adapter(model, tmp_path)
    return tmp_path


def test_adapter_for_another_base_names_key_and_both_shapes(tmp_path):
    _saved(tmp_path, r=4, target_modules=["q_proj"])
    other = tiny_llama(hidden_size=48, num_attention_heads=4)
    with pytest.raises(AdapterError) as err:
        load_adapter(other, tmp_path)
    message = str(err.value)
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in message
    assert "(4, 32)" in message and "(4, 48)" in message
    assert not any("adapters" in k for k in other.state_dict()), "half-loaded adapter left behind"


def test_missing_key_is_named(tmp_path):
    from safetensors.torch import load_file, save_file

    _saved(tmp_path, r=4, target_modules=["q_proj"])
    path = tmp_path / "adapter_model.safetensors"
    tensors = load_file(str(path))
    dropped = "base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight"
    del tensors[dropped]
    save_file(tensors, str(path))
    with pytest.raises(AdapterError, match=f"no tensor '{dropped}'"):
        load_adapter(tiny_llama(), tmp_path)


def test_truncated_safetensors_file(tmp_path):
    _saved(tmp_path, r=4, target_modules=["q_proj"])
    path = tmp_path / "adapter_model.safetensors"
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(AdapterError, match="corrupt or truncated"):
        load_adapter(tiny_llama(), tmp_path)


def test_config_that_is_not_json(tmp_path):
    _saved(tmp_path, r=4, target_modules=["q_proj"])
    (tmp_path / "adapter_config.json").write_text("r: 4\ntarget_modules: [q_proj]\n")
    with pytest.raises(ConfigError, match="adapter_config.json is not valid JSON"):
        load_adapter(tiny_llama(), tmp_path)


def test_unknown_config_keys_warn_and_load(tmp_path):
    _saved(tmp_path, r=4, target_modules=["q_proj"])
    path = tmp_path / "adapter_config.json"
    data = json.loads(path.read_text())
    data["future_feature"] = {"enabled": True}
    path.write_text(json.dumps(data))
    with pytest.warns(UserWarning, match="ignoring keys tuneforge does not use: future_feature"):
        load_adapter(tiny_llama(), tmp_path)


def test_duplicate_and_invalid_adapter_names():
    model = tiny_llama()
    add_adapter(model, LoraConfig(target_modules=["q_proj"]), "first")
    with pytest.raises(AdapterError, match="already has an adapter named 'first'"):
        add_adapter(model, LoraConfig(target_modules=["q_proj"]), "first")
    with pytest.raises(AdapterError, match="may use only letters"):
        add_adapter(model, LoraConfig(target_modules=["q_proj"]), "a.b")


def test_safe_merge_refuses_non_finite_and_keeps_base(tmp_path):
    import torch

    from tuneforge.adapters import merge_adapters

    model = tiny_llama()
    add_adapter(model, LoraConfig(r=2, target_modules=["q_proj"]))
    layer = model.model.layers[0].self_attn.q_proj
    before = layer.base_layer.weight.detach().clone()
    with torch.no_grad():
        layer.adapters["default"].lora_B.fill_(float("inf"))
    with pytest.raises(AdapterError, match="NaN/Inf"):
        merge_adapters(model, safe=True)
    assert torch.equal(layer.base_layer.weight, before)


def test_merging_a_mix_with_an_unmergeable_adapter_changes_nothing():
    from tiny_models import perturb_trainable, sample_ids

    from tuneforge.adapters import merge_adapters, set_active_adapters
    from tuneforge.adapters.mixtures.mole import MoleConfig

    model = tiny_llama()
    add_adapter(model, LoraConfig(r=4, target_modules=["up_proj"]), "lora")
    add_adapter(model, MoleConfig(r=2, num_experts=2, top_k=1, train_experts=False, target_modules=["up_proj"]), "mole")
    perturb_trainable(model)
    set_active_adapters(model, ["lora", "mole"])
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(AdapterError, match=r"'mole' \(.*\) cannot be merged.*base model is unchanged"):
        merge_adapters(model, ["lora", "mole"])
    assert all(not layer.merged for layer in model.modules() if hasattr(layer, "merged"))
    for key, value in model.state_dict().items():
        assert value.equal(before[key]), f"{key} changed by a refused merge"
    assert model(sample_ids()).logits.isfinite().all()


def test_every_method_config_is_importable_from_the_package():
    import tuneforge.adapters as adapters
    from tuneforge.adapters import list_methods

    for spec in list_methods():
        assert getattr(adapters, spec.config_class.__name__) is spec.config_class
    with pytest.raises(AttributeError, match="NoSuchConfig"):
        adapters.NoSuchConfig  # noqa: B018


def test_a_block_called_by_keyword_can_be_wrapped():
    # Llama calls self_attn(hidden_states=...): wrapping the whole attention block must still work.
    from tiny_models import sample_ids

    from tuneforge.adapters import add_adapter
    from tuneforge.adapters.selective.bottleneck import BottleneckConfig

    base = tiny_llama()
    model = copy.deepcopy(base)
    add_adapter(model, BottleneckConfig(target_modules=["self_attn"], reduction_factor=4))
    assert type(model.model.layers[0].self_attn).__name__ == "AdaptedLayer"
    ids = sample_ids()
    assert torch.equal(model(ids).logits, base(ids).logits)  # zero-init up-projection: unchanged
