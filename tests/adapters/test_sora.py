"""SoRA: the proximal soft threshold, gates pruned to zero reduce the effective rank, the gated delta."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_models import perturb_trainable, sample_ids, tiny_llama

from tuneforge.adapters import add_adapter, merge_adapters
from tuneforge.adapters.hooks import training_hooks
from tuneforge.adapters.model import wrapped_layers
from tuneforge.adapters.rank.sora import SoraConfig, effective_ranks, soft_threshold

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
    _, model = sora_model(sora_lambda=0.1, lambda_schedule=schedule)
    with torch.no_grad():
        for gate in gates(model).values():
            gate.copy_(torch.tensor([0.5, -0.08, 0.02, -1.0]))
    hooks = training_hooks(model, "default")
    before = {name: gate.detach().clone() for name, gate in gates(model).items()}
    hooks.after_optimizer_step(model, 1, 4)
    # The reference's SparseAdamW thresholds by ξ itself, not by a learning rate times ξ.
    threshold = 0.1 * (2 / 4 if schedule == "linear" else 1.0)
    for name, gate in gates(model).items():
        torch.testing.assert_close(gate.detach(), naive_soft_threshold(before[name], threshold))


def test_large_lambda_prunes_ranks_and_zero_gates_give_the_base_model():
    base, model = sora_model(sora_lambda=0.6)
    with torch.no_grad():
        for gate in gates(model).values():
            gate.fill_(1.0)
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


def test_default_settings_prune_ranks_within_the_comparison_budget():
    """100 optimizer steps (the method comparison's budget) with SoRA's and training's defaults."""
    from tuneforge.config.schema import TrainingConfig
    from tuneforge.train.optim import build_optimizer

    torch.manual_seed(0)
    _, model = sora_model(r=8, target_modules=["q_proj", "v_proj", "up_proj", "down_proj"])
    hooks = training_hooks(model, "default")
    optimizer = build_optimizer(model, TrainingConfig())
    full = 8 * len(gates(model))
    assert sum(effective_ranks(model).values()) == full
    model.train()
    for step in range(100):
        ids = sample_ids(batch=4, length=12, seed=step % 4)  # a small synthetic task: 4 fixed batches
        model(ids, labels=ids).loss.backward()
        hooks.before_optimizer_step(model, step, 100)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        hooks.after_optimizer_step(model, step, 100)
    kept = sum(effective_ranks(model).values())
    assert kept < full, "no rank was pruned in 100 steps with the default sora_lambda"


def test_a_training_step_is_adamw_then_the_soft_threshold():
    _, model = sora_model(sora_lambda=0.05)
    perturb_trainable(model, scale=0.3)
    hooks = training_hooks(model, "default")
    lr = 1e-2
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    ids = sample_ids()
    model(ids, labels=ids).loss.backward()
    before = {name: (gate.detach().clone(), gate.grad.clone()) for name, gate in gates(model).items()}
    optimizer.step()
    hooks.after_optimizer_step(model, 0, 10)
    for name, gate in gates(model).items():
        value, grad = before[name]
        adam_step = value - lr * grad / (grad.abs() + 1e-8)  # Adam's first step, written out
        torch.testing.assert_close(gate.detach(), naive_soft_threshold(adam_step, 0.05), atol=1e-6, rtol=1e-5)


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
        "adapter": {"method": "sora", "r": 4, "sora_lambda": 0.3, "lambda_schedule": "linear",
                    "target_modules": ["q_proj", "v_proj"]},
        "data": {"train": "arithmetic", "options": {"size": 24}, "max_seq_len": 192, "eval_size": 0},
        "training": {"max_steps": 4, "batch_size": 4, "lr": 1e-3, "seed": 3},
    })
    snapshots = {}

    def remember_gates(step, loss):
        snapshots[step] = torch.cat([gate.detach().clone() for gate in gates(model).values()])

    train(config, model_and_tokenizer=(model, tokenizer), on_step=remember_gates)
    # ξ ramps linearly to 0.3 over 4 steps: step s (1-based) thresholds by 0.3·s/4. Between two steps a
    # gate moves by Adam (at most ~lr = 1e-3) and then shrinks by ξ, or is pruned if it was below ξ.
    assert sorted(snapshots) == [1, 2, 3, 4]
    for step in (2, 3, 4):
        threshold = 0.3 * step / 4
        for before, after in zip(snapshots[step - 1].tolist(), snapshots[step].tolist()):
            if abs(before) < threshold - 0.01:
                assert after == 0.0
            elif abs(before) > threshold + 0.01:
                assert abs(after) == pytest.approx(abs(before) - threshold, abs=3e-3)
    assert int((snapshots[4] == 0).sum()) > 0
