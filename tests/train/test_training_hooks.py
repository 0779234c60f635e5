"""The training loop calls a method's hooks: prepare with data, extra loss, before/after each step."""

from __future__ import annotations

import dataclasses

import torch
from tiny_models import tiny_chat_model_and_tokenizer

from tuneforge.adapters import registry
from tuneforge.adapters.hooks import TrainingHooks
from tuneforge.config import parse_train_config
from tuneforge.train import train


class RecordingHooks(TrainingHooks):
    def __init__(self, penalty: float):
        self.penalty = penalty
        self.calls: list = []
        self.grad_seen = []

    def prepare(self, model, batches, loss_fn):
        batches = list(batches)
        self.calls.append(("prepare", len(batches), float(loss_fn(model, batches[0]))))

    def extra_loss(self, model):
        lora_a = next(p for n, p in model.named_parameters() if n.endswith("lora_A"))
        return self.penalty * lora_a.pow(2).sum()

    def before_optimizer_step(self, model, step, total_steps):
        self.grad_seen.append(all(p.grad is not None for p in model.parameters() if p.requires_grad))
        self.calls.append(("before", step, total_steps))

    def after_optimizer_step(self, model, step, total_steps):
        self.calls.append(("after", step, total_steps))


def run_with_hooks(tmp_path, monkeypatch, penalty: float, name: str):
    hooks = RecordingHooks(penalty)
    spec = registry.get_method("lora")
    monkeypatch.setitem(registry._METHODS, "lora", dataclasses.replace(spec, hooks=lambda m, n, c: hooks))
    config = parse_train_config({
        "output_dir": str(tmp_path / name),
        "adapter": {"r": 4},
        "data": {"train": "arithmetic", "options": {"size": 24}, "max_seq_len": 192, "eval_size": 0},
        "training": {"max_steps": 3, "batch_size": 4, "lr": 1e-2, "seed": 3, "init_batches": 2},
    })
    losses = []
    train(config, model_and_tokenizer=tiny_chat_model_and_tokenizer(), on_step=lambda s, loss: losses.append(loss))
    return hooks, losses


def test_loop_calls_every_hook_in_order(tmp_path, monkeypatch):
    hooks, _ = run_with_hooks(tmp_path, monkeypatch, 0.0, "plain")
    assert hooks.calls[0][:2] == ("prepare", 2) and torch.isfinite(torch.tensor(hooks.calls[0][2]))
    assert hooks.calls[1:] == [(kind, step, 3) for step in range(3) for kind in ("before", "after")]
    assert all(hooks.grad_seen)


def test_extra_loss_changes_training(tmp_path, monkeypatch):
    _, plain = run_with_hooks(tmp_path, monkeypatch, 0.0, "plain")
    _, penalised = run_with_hooks(tmp_path, monkeypatch, 10.0, "penalised")
    assert plain[0] == penalised[0]  # the reported loss is the token loss alone
    assert plain[1:] != penalised[1:]  # but the penalty's gradient changed the steps taken


def test_trainer_gives_prompt_tuning_the_tokenizer_for_text_init(tmp_path):
    model, tokenizer = tiny_chat_model_and_tokenizer()
    config = parse_train_config({
        "output_dir": str(tmp_path / "text-init"),
        "adapter": {"method": "prompt-tuning", "num_virtual_tokens": 3, "init": "text",
                    "init_text": "How many apples"},
        "data": {"train": "arithmetic", "options": {"size": 8}, "max_seq_len": 120, "eval_size": 0},
        "training": {"max_steps": 1, "batch_size": 4, "lr": 1e-9, "seed": 3},
    })
    train(config, model_and_tokenizer=(model, tokenizer))
    prompt = model.tuneforge_model_adapters.adapters["default"].prompt_embeddings.detach()
    ids = tokenizer("How many apples", add_special_tokens=False)["input_ids"]
    expected = model.get_input_embeddings().weight.detach()[(ids * 3)[:3]]
    torch.testing.assert_close(prompt, expected, atol=1e-5, rtol=0)  # lr ~0: still the text's embeddings
