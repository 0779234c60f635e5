"""Sparse finetuning: the final density after a short training run, the projection rule, the file."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import sample_ids, tiny_gpt2, tiny_llama

from tuneforge.adapters import add_adapter, load_adapter, merge_and_unload, save_adapter
from tuneforge.adapters.hooks import training_hooks
from tuneforge.adapters.sparse_ft import SparseFTConfig
from tuneforge.errors import AdapterError


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def train(model, steps: int) -> None:
    """A minimal loop calling the hooks the way train/loop.py does."""
    hooks = training_hooks(model, "default")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = sample_ids()
    for step in range(steps):
        model(ids, labels=ids).loss.backward()
        hooks.before_optimizer_step(model, step, steps)
        optimizer.step()
        optimizer.zero_grad()
        hooks.after_optimizer_step(model, step, steps)


def deltas(model):
    return {name: module.adapters["default"] for name, module in model.named_modules() if hasattr(module, "adapters")}


@pytest.mark.parametrize("project_every", [None, 2])
def test_final_density_is_the_target(project_every):
    model = tiny_llama()
    add_adapter(model, SparseFTConfig(target_density=0.03, project_every=project_every, target_modules=["q_proj", "gate_proj"]))
    train(model, steps=3)
    for name, adapter in deltas(model).items():
        numel = adapter.delta.numel()
        assert int((adapter.delta != 0).sum()) == round(0.03 * numel), name


def test_projection_keeps_the_largest_entries():
    model = tiny_llama()
    add_adapter(model, SparseFTConfig(target_density=0.1, target_modules=["o_proj"]))
    adapter = model.model.layers[0].self_attn.o_proj.adapters["default"]
    dense = torch.randn(32, 32)
    with torch.no_grad():
        adapter.delta.copy_(dense)
    adapter.project()
    keep = round(0.1 * 1024)
    threshold = dense.abs().flatten().topk(keep).values.min()
    expected = torch.where(dense.abs() >= threshold, dense, torch.zeros(()))
    torch.testing.assert_close(adapter.delta.detach(), expected, atol=0, rtol=0)


def test_file_holds_indices_and_values_of_the_projected_delta(tmp_path):
    base = tiny_gpt2()
    model = copy.deepcopy(base)
    add_adapter(model, SparseFTConfig(target_density=0.02, target_modules=["c_fc"]))
    train(model, steps=2)
    save_adapter(model, tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    key = "base_model.model.transformer.h.0.mlp.c_fc"
    assert tensors[f"{key}.sparse_values"].shape == (round(0.02 * 32 * 128),)
    fresh = copy.deepcopy(base)
    load_adapter(fresh, tmp_path)
    ids = sample_ids()
    torch.testing.assert_close(logits(fresh, ids), logits(model, ids), atol=0, rtol=0)
    merged = merge_and_unload(fresh)
    changed = merged.transformer.h[0].mlp.c_fc.weight != base.transformer.h[0].mlp.c_fc.weight
    assert int(changed.sum()) == round(0.02 * 32 * 128)


def test_indices_outside_the_weight_are_rejected(tmp_path):
    model = tiny_llama()
    add_adapter(model, SparseFTConfig(target_modules=["q_proj"]))
    adapter = model.model.layers[0].self_attn.q_proj.adapters["default"]
    with pytest.raises(AdapterError, match="different base model"):
        adapter.load_file_tensors({"sparse_indices": torch.tensor([5000]), "sparse_values": torch.tensor([1.0])}, "x")


def test_training_loop_projects_before_saving(tmp_path):
    from tiny_models import tiny_chat_model_and_tokenizer

    from tuneforge.config import parse_train_config
    from tuneforge.train import train

    config = parse_train_config({
        "output_dir": str(tmp_path / "run"),
        "adapter": {"method": "sparse-ft", "target_density": 0.02, "target_modules": ["q_proj", "down_proj"]},
        "data": {"train": "arithmetic", "options": {"size": 24}, "max_seq_len": 192, "eval_size": 0},
        "training": {"max_steps": 3, "batch_size": 4, "lr": 1e-2, "seed": 3},
    })
    summary = train(config, model_and_tokenizer=tiny_chat_model_and_tokenizer())
    tensors = load_file(str(summary.adapter_dir / "adapter_model.safetensors"))
    sizes = {key.rsplit(".", 2)[-2]: value.numel() for key, value in tensors.items() if key.endswith("sparse_values")}
    assert sizes == {"q_proj": round(0.02 * 48 * 48), "down_proj": round(0.02 * 64 * 48)}
