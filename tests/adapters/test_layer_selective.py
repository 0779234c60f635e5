"""Layer-selective finetuning: which layers train, how top_k / by_importance resolve, bad indices."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import sample_ids, tiny_llama

from tuneforge.adapters import add_adapter, save_adapter
from tuneforge.adapters.hooks import training_hooks
from tuneforge.adapters.selective.layer_selective import LayerSelectConfig, resolve_layer_selection
from tuneforge.adapters.model import adapter_book
from tuneforge.errors import AdapterError, ConfigError


def loss_fn(model, batch):
    return model(batch["input_ids"], labels=batch["input_ids"]).loss


def test_only_the_chosen_layer_trains_and_is_saved(tmp_path):
    model = tiny_llama(num_hidden_layers=3)
    targets = add_adapter(model, LayerSelectConfig(layers=[1]))
    assert targets and all(t.startswith("model.layers.1.") for t in targets)
    assert len(targets) == 7  # q, k, v, o, gate, up, down
    save_adapter(model, tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    assert all(".layers.1." in key and key.endswith(".layer_delta") for key in tensors)
    assert tensors["base_model.model.model.layers.1.mlp.up_proj.layer_delta"].shape == (64, 32)


def test_training_the_delta_equals_training_the_weight():
    """One SGD step on ΔW changes the output exactly like one SGD step on W itself."""
    base = tiny_llama()
    ids = sample_ids()
    ours = copy.deepcopy(base)
    add_adapter(ours, LayerSelectConfig(layers=[0]))
    reference = copy.deepcopy(base)
    for name, param in reference.named_parameters():
        param.requires_grad_(name.startswith("model.layers.0.") and "norm" not in name)
    for model in (ours, reference):
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
        model(ids, labels=ids).loss.backward()
        optimizer.step()
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, reference(ids).logits, atol=1e-5, rtol=1e-4)


def test_top_k_picks_the_last_layers_in_prepare():
    model = tiny_llama(num_hidden_layers=4)
    add_adapter(model, LayerSelectConfig(top_k=2))
    assert not any(p.requires_grad for p in model.parameters())  # placeholders until prepare
    training_hooks(model, "default").prepare(model, [], loss_fn)
    config = adapter_book(model).configs["default"]
    assert config.layers == [2, 3]
    trainable = {n.split(".")[2] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"2", "3"}


def test_by_importance_picks_the_layers_with_the_largest_gradients():
    model = tiny_llama(num_hidden_layers=3)
    ids = sample_ids()
    reference = copy.deepcopy(model)
    for param in reference.parameters():
        param.requires_grad_(True)
    loss_fn(reference, {"input_ids": ids}).backward()
    norms = {i: sum(float(m.weight.grad.pow(2).sum()) for m in layer.modules() if isinstance(m, torch.nn.Linear))
             for i, layer in enumerate(reference.model.layers)}
    expected = sorted(sorted(norms, key=norms.get, reverse=True)[:1])
    add_adapter(model, LayerSelectConfig(top_k=1, by_importance=True))
    training_hooks(model, "default").prepare(model, [{"input_ids": ids}], loss_fn)
    assert adapter_book(model).configs["default"].layers == expected


def test_a_layer_that_does_not_exist_names_the_valid_range():
    model = tiny_llama()
    with pytest.raises(AdapterError, match=r"layers \[7\] do not exist.*valid layer indices: 0\.\.1"):
        resolve_layer_selection(model, LayerSelectConfig(layers=[0, 7]))
    add_adapter(model, LayerSelectConfig(layers=[0, 7]))
    with pytest.raises(AdapterError, match="valid layer indices: 0..1"):
        training_hooks(model, "default").prepare(model, [], loss_fn)
    with pytest.raises(AdapterError, match="top_k=5 but LlamaForCausalLM has 2 layers"):
        resolve_layer_selection(tiny_llama(), LayerSelectConfig(top_k=5))


def test_config_needs_exactly_one_way_to_choose():
    from tuneforge.adapters.config import validate_config

    with pytest.raises(ConfigError, match="exactly one of layers"):
        validate_config(LayerSelectConfig, {"layers": [0], "top_k": 1}, "run.yaml")
    with pytest.raises(ConfigError, match="by_importance: true needs top_k"):
        validate_config(LayerSelectConfig, {"layers": [0], "by_importance": True}, "run.yaml")


def test_training_loop_resolves_top_k_and_saves_the_chosen_layers(tmp_path):
    import json

    from tiny_models import tiny_chat_model_and_tokenizer

    from tuneforge.config import parse_train_config
    from tuneforge.train import train

    config = parse_train_config({
        "output_dir": str(tmp_path / "run"),
        "adapter": {"method": "layer-select", "top_k": 1, "by_importance": True},
        "data": {"train": "arithmetic", "options": {"size": 24}, "max_seq_len": 192, "eval_size": 0},
        "training": {"max_steps": 2, "batch_size": 4, "lr": 1e-2, "seed": 3, "init_batches": 2},
    })
    summary = train(config, model_and_tokenizer=tiny_chat_model_and_tokenizer())
    saved = json.loads((summary.adapter_dir / "adapter_config.json").read_text())
    assert len(saved["layers"]) == 1 and saved["top_k"] is None
    tensors = load_file(str(summary.adapter_dir / "adapter_model.safetensors"))
    assert len(tensors) == 7 and all(f".layers.{saved['layers'][0]}." in key for key in tensors)
    assert any(t.abs().sum() > 0 for t in tensors.values())
