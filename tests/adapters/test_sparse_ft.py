"""Diff pruning: the hard-concrete gate and expected L0 against the paper's formulas, gates that close
under the penalty, projection onto the target density, retraining on the fixed mask, and the file."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import sample_ids, tiny_gpt2, tiny_llama

from tuneforge.adapters import add_adapter, load_adapter, merge_and_unload, save_adapter
from tuneforge.adapters.hooks import training_hooks
from tuneforge.adapters.selective.sparse_ft import (
    SparseFTConfig,
    expected_l0,
    hard_concrete_mean_gate,
    hard_concrete_sample,
)
from tuneforge.errors import AdapterError


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def train(model, steps: int, lr: float = 1e-2, on_step=None) -> None:
    """A minimal loop calling the hooks the way train/loop.py does (extra loss included)."""
    hooks = training_hooks(model, "default")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    ids = sample_ids()
    model.train()
    for step in range(steps):
        loss = model(ids, labels=ids).loss
        extra = hooks.extra_loss(model)
        (loss if extra is None else loss + extra).backward()
        hooks.before_optimizer_step(model, step, steps)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if on_step is not None:
            on_step(step, "before projection")
        hooks.after_optimizer_step(model, step, steps)
        if on_step is not None:
            on_step(step, "after projection")
    model.eval()


def deltas(model):
    return {name: module.adapters["default"] for name, module in model.named_modules() if hasattr(module, "adapters")}


def sigmoid(value: float) -> float:
    return 1.0 / (1.0 + math.exp(-value))


@pytest.mark.parametrize(("lower", "upper"), [(-1.5, 1.5), (-0.1, 1.1)])
def test_hard_concrete_gate_and_expected_l0_follow_the_paper(lower, upper):
    log_alpha = torch.tensor([-3.0, -0.5, 0.0, 0.7, 2.0, 5.0], dtype=torch.float64)
    uniform = torch.tensor([0.01, 0.3, 0.5, 0.62, 0.9, 0.999], dtype=torch.float64)
    sampled = hard_concrete_sample(log_alpha, uniform, lower, upper)
    for z, a, u in zip(sampled.tolist(), log_alpha.tolist(), uniform.tolist()):
        s = sigmoid(math.log(u) - math.log(1 - u) + a)
        assert z == pytest.approx(min(1.0, max(0.0, s * (upper - lower) + lower)), abs=1e-12)
    for z, a in zip(hard_concrete_mean_gate(log_alpha, lower, upper).tolist(), log_alpha.tolist()):
        assert z == pytest.approx(min(1.0, max(0.0, sigmoid(a) * (upper - lower) + lower)), abs=1e-12)
    expected = sum(sigmoid(a - math.log(-lower / upper)) for a in log_alpha.tolist())
    assert expected_l0(log_alpha, lower, upper).item() == pytest.approx(expected, abs=1e-12)
    # And P(z != 0) is what the penalty says, by sampling.
    generator = torch.Generator().manual_seed(0)
    many = torch.rand((200_000, 1), generator=generator, dtype=torch.float64).clamp(1e-9, 1 - 1e-9)
    open_fraction = (hard_concrete_sample(log_alpha, many, lower, upper) > 0).double().mean(0)
    for fraction, a in zip(open_fraction.tolist(), log_alpha.tolist()):
        assert fraction == pytest.approx(sigmoid(a - math.log(-lower / upper)), abs=0.005)


def test_layer_applies_gated_delta_in_training_and_the_mean_gate_in_eval():
    model = tiny_llama()
    add_adapter(model, SparseFTConfig(target_modules=["o_proj"], gate_init=0.3))
    layer = model.model.layers[0].self_attn.o_proj
    adapter = layer.adapters["default"]
    with torch.no_grad():
        adapter.delta.normal_()
    x = torch.randn(3, 32)
    gate = hard_concrete_mean_gate(adapter.gate_log_alpha, -1.5, 1.5)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), x @ (layer.base_layer.weight + adapter.delta * gate).T)
    adapter.train()
    torch.manual_seed(1)
    sampled = layer(x)
    torch.manual_seed(1)
    uniform = torch.rand_like(adapter.gate_log_alpha).clamp(1e-6, 1 - 1e-6)
    z = hard_concrete_sample(adapter.gate_log_alpha, uniform, -1.5, 1.5)
    torch.testing.assert_close(sampled, x @ (layer.base_layer.weight + adapter.delta * z).T)
    sampled.sum().backward()
    assert adapter.gate_log_alpha.grad.abs().sum() > 0, "the gates learn through the relaxation"


@pytest.mark.parametrize("penalty", [0.0, 1e-3])
def test_the_l0_penalty_closes_gates_and_the_open_gates_are_what_is_kept(penalty):
    model = tiny_llama()
    add_adapter(model, SparseFTConfig(target_modules=["q_proj", "down_proj"], target_density=None, l0_penalty=penalty,
                                      gate_lr=1.0, retrain_fraction=0.1))
    open_gates = {}

    def record(step, moment):
        if moment == "before projection" and step == 8:  # projection_step(10, 0.1) = 9, after step index 8
            for name, adapter in deltas(model).items():
                open_gates[name] = hard_concrete_mean_gate(adapter.gate_log_alpha, -1.5, 1.5).detach() > 0

    train(model, steps=10, on_step=record)
    densities = []
    for name, adapter in deltas(model).items():
        assert adapter.projected and not adapter.gated
        assert torch.equal(adapter.mask.bool(), open_gates[name] & (adapter.mask.bool() | ~open_gates[name])), name
        assert not (adapter.mask.bool() & ~open_gates[name]).any(), f"{name}: kept an entry whose gate was closed"
        densities.append(adapter.density())
    if penalty:
        assert max(densities) < 0.5, densities  # Adam moves α from 5 by ~gate_lr per step: most gates closed
    else:
        assert min(densities) > 0.9, densities  # no penalty: the gates stay open


def test_magnitude_projection_retrains_on_the_fixed_mask():
    model = tiny_llama()
    add_adapter(model, SparseFTConfig(selection="magnitude-projection", target_density=0.05, retrain_fraction=0.5,
                                      target_modules=["q_proj", "up_proj"]))
    assert all(not adapter.gated for adapter in deltas(model).values())
    at_projection = {}

    def record(step, moment):
        if moment == "after projection" and step == 2:  # 6 steps, half retrain: projected after the third
            at_projection.update({name: (a.mask.clone(), a.effective_delta().detach().clone())
                                  for name, a in deltas(model).items()})

    train(model, steps=6, on_step=record)
    for name, adapter in deltas(model).items():
        mask, values = at_projection[name]
        assert int(mask.sum()) == round(0.05 * mask.numel()), name
        now = adapter.effective_delta().detach()
        assert torch.equal(adapter.mask, mask), f"{name}: the mask moved while retraining"
        assert not now[mask == 0].any(), f"{name}: a pruned entry came back"
        assert not torch.equal(now[mask == 1], values[mask == 1]), f"{name}: the kept entries did not retrain"


def test_projection_keeps_the_largest_entries():
    model = tiny_llama()
    add_adapter(model, SparseFTConfig(selection="magnitude-projection", target_density=0.1, target_modules=["o_proj"]))
    adapter = model.model.layers[0].self_attn.o_proj.adapters["default"]
    dense = torch.randn(32, 32)
    with torch.no_grad():
        adapter.delta.copy_(dense)
    adapter.project()
    keep = round(0.1 * 1024)
    threshold = dense.abs().flatten().topk(keep).values.min()
    expected = torch.where(dense.abs() >= threshold, dense, torch.zeros(()))
    torch.testing.assert_close(adapter.effective_delta().detach(), expected, atol=0, rtol=0)


def test_file_holds_indices_and_values_of_the_projected_delta(tmp_path):
    base = tiny_gpt2()
    model = copy.deepcopy(base)
    add_adapter(model, SparseFTConfig(target_density=0.02, target_modules=["c_fc"]))
    train(model, steps=3)
    save_adapter(model, tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    key = "base_model.model.transformer.h.0.mlp.c_fc"
    assert tensors[f"{key}.sparse_values"].shape == (round(0.02 * 32 * 128),)
    assert f"{key}.diff_log_alpha" not in tensors, "a projected adapter has no gates left to save"
    fresh = copy.deepcopy(base)
    load_adapter(fresh, tmp_path)
    ids = sample_ids()
    torch.testing.assert_close(logits(fresh, ids), logits(model, ids), atol=0, rtol=0)
    merged = merge_and_unload(fresh)
    changed = merged.transformer.h[0].mlp.c_fc.weight != base.transformer.h[0].mlp.c_fc.weight
    assert int(changed.sum()) == round(0.02 * 32 * 128)


def test_an_adapter_saved_before_the_projection_keeps_its_gates(tmp_path):
    base = tiny_llama()
    model = copy.deepcopy(base)
    add_adapter(model, SparseFTConfig(target_modules=["v_proj"], gate_init=0.2))
    with torch.no_grad():
        for adapter in deltas(model).values():
            adapter.delta.normal_()
            adapter.gate_log_alpha.normal_()
    save_adapter(model, tmp_path)
    fresh = copy.deepcopy(base)
    load_adapter(fresh, tmp_path)
    for name, adapter in deltas(fresh).items():
        assert adapter.gated and not adapter.projected
        torch.testing.assert_close(adapter.gate_log_alpha, deltas(model)[name].gate_log_alpha, atol=0, rtol=0)
    ids = sample_ids()
    torch.testing.assert_close(logits(fresh, ids), logits(model, ids), atol=0, rtol=0)


def test_indices_outside_the_weight_are_rejected():
    model = tiny_llama()
    add_adapter(model, SparseFTConfig(target_modules=["q_proj"]))
    adapter = model.model.layers[0].self_attn.q_proj.adapters["default"]
    with pytest.raises(AdapterError, match="different base model"):
        adapter.load_file_tensors({"sparse_indices": torch.tensor([5000]), "sparse_values": torch.tensor([1.0])}, "x")


def test_magnitude_projection_needs_a_density():
    with pytest.raises(ValueError, match="magnitude-projection needs a target_density"):
        SparseFTConfig(selection="magnitude-projection", target_density=None)


def test_training_loop_projects_before_saving(tmp_path):
    from tiny_models import tiny_chat_model_and_tokenizer

    from tuneforge.config import parse_train_config
    from tuneforge.train import train as run_training

    config = parse_train_config({
        "output_dir": str(tmp_path / "run"),
        "adapter": {"method": "sparse-ft", "target_density": 0.02, "target_modules": ["q_proj", "down_proj"]},
        "data": {"train": "arithmetic", "options": {"size": 24}, "max_seq_len": 192, "eval_size": 0},
        "training": {"max_steps": 3, "batch_size": 4, "lr": 1e-2, "seed": 3},
    })
    summary = run_training(config, model_and_tokenizer=tiny_chat_model_and_tokenizer())
    tensors = load_file(str(summary.adapter_dir / "adapter_model.safetensors"))
    sizes = {key.rsplit(".", 2)[-2]: value.numel() for key, value in tensors.items() if key.endswith("sparse_values")}
    assert sizes == {"q_proj": round(0.02 * 48 * 48), "down_proj": round(0.02 * 64 * 48)}
    assert not any(key.endswith("diff_log_alpha") for key in tensors)
