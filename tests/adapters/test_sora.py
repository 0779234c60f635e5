"""SoRA: the proximal soft threshold, gates pruned to zero reduce the effective rank, the gated delta."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_models import perturb_trainable, sample_ids, tiny_llama

from tuneforge.adapters import add_adapter, merge_adapters
from tuneforge.adapters.hooks import training_hooks
from tuneforge.adapters.model import wrapped_layers
from tuneforge.adapters.sora import SoraConfig, effective_ranks, soft_threshold

TARGETS = ["q_proj", "o_proj"]


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def naive_soft_threshold(values, threshold):
    out = []
    for v in values.tolist():
        if v > threshold:
            out.append(v - threshold)
        elif v < -threshold:
            out.append(v + threshold)
        else:
            out.append(0.0)
    return torch.tensor(out)


def test_soft_threshold_matches_the_naive_rule():
    values = torch.tensor([-2.0, -0.3, -0.1, 0.0, 0.05, 0.1, 0.25, 3.0])
    for threshold in (0.0, 0.1, 0.2, 5.0):
        torch.testing.assert_close(soft_threshold(values, threshold), naive_soft_threshold(values, threshold))


def sora_model(**settings):
    base = tiny_llama()
    model = copy.deepcopy(base)
    add_adapter(model, SoraConfig(**{"r": 4, "target_modules": TARGETS, **settings}))
    return base, model


def gates(model):
    return {name: layer.adapters["default"].gate for name, layer in wrapped_layers(model)}


@pytest.mark.parametrize("schedule", ["constant", "linear"])
def test_hook_applies_the_proximal_step_with_the_scheduled_lambda(schedule):
    _, model = sora_model(sora_lambda=2.0, gate_lr=0.05, lambda_schedule=schedule)
    with torch.no_grad():
        for gate in gates(model).values():
            gate.copy_(torch.tensor([0.5, -0.08, 0.02, -1.0]))
    hooks = training_hooks(model, "default")
    before = {name: gate.detach().clone() for name, gate in gates(model).items()}
    hooks.after_optimizer_step(model, 1, 4)
    threshold = 0.05 * 2.0 * (2 / 4 if schedule == "linear" else 1.0)
    for name, gate in gates(model).items():
        torch.testing.assert_close(gate.detach(), naive_soft_threshold(before[name], threshold))


def test_large_lambda_prunes_ranks_and_zero_gates_give_the_base_model():
    base, model = sora_model(sora_lambda=60.0, gate_lr=0.01)
    perturb_trainable(model)
    hooks = training_hooks(model, "default")
    assert effective_ranks(model) == {name: 4 for name in gates(model)}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    ids = sample_ids()
    model.train()
    history = []
    for step in range(3):
        model(ids, labels=ids).loss.backward()
        hooks.before_optimizer_step(model, step, 3)
        optimizer.step()
        optimizer.zero_grad()
        hooks.after_optimizer_step(model, step, 3)
        history.append(sum(effective_ranks(model).values()))
    # Threshold 0.6 per step on gates near 1: all alive after one step, all pruned after two.
    assert history == [4 * len(gates(model)), 0, 0]
    model.eval()
    torch.testing.assert_close(logits(model, ids), logits(base, ids), atol=1e-6, rtol=0)


def test_effective_ranks_count_non_zero_gates():
    _, model = sora_model()
    patterns = [[0.5, 0.0, 0.0, -0.2], [0.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0], [0.0, 3.0, 0.0, 0.0]]
    with torch.no_grad():
        for gate, pattern in zip(gates(model).values(), patterns):
            gate.copy_(torch.tensor(pattern))
    assert list(effective_ranks(model).values()) == [2, 0, 4, 1]


def test_delta_is_the_gated_sum_of_rank_one_terms_and_merges_exactly():
    base, model = sora_model(alpha=6.0)
    perturb_trainable(model, scale=0.3)
    ids = sample_ids()
    for name, layer in wrapped_layers(model):
        adapter = layer.adapters["default"]
        expected = torch.zeros(adapter.lora_B.shape[0], adapter.lora_A.shape[1])
        for i in range(4):
            expected += float(adapter.gate[i]) * torch.outer(adapter.lora_B[:, i], adapter.lora_A[i]).detach()
        torch.testing.assert_close(adapter.delta_weight(layer.base_layer).detach(), expected * 6.0 / 4, atol=1e-6, rtol=1e-5)
    unmerged = logits(model, ids)
    merge_adapters(model)
    torch.testing.assert_close(logits(model, ids), unmerged, atol=1e-5, rtol=1e-4)


def test_training_loop_runs_the_proximal_step(tmp_path):
    from tiny_models import tiny_chat_model_and_tokenizer

    from tuneforge.config import parse_train_config
    from tuneforge.train import train

    model, tokenizer = tiny_chat_model_and_tokenizer()
    config = parse_train_config({
        "output_dir": str(tmp_path / "run"),
        "adapter": {"method": "sora", "r": 4, "sora_lambda": 30.0, "gate_lr": 0.01, "lambda_schedule": "linear",
                    "target_modules": ["q_proj", "v_proj"]},
        "data": {"train": "arithmetic", "options": {"size": 24}, "max_seq_len": 192, "eval_size": 0},
        "training": {"max_steps": 4, "batch_size": 4, "lr": 1e-3, "seed": 3},
    })
    train(config, model_and_tokenizer=(model, tokenizer))
    # λ ramps to 30 over 4 steps: thresholds 0.075 + 0.15 + 0.225 + 0.3 = 0.75 in all; gates started at 1.
    for gate in gates(model).values():
        assert torch.all(gate.abs() < 0.3) and torch.all(gate.abs() > 0.2)
