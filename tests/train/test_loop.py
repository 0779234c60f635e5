"""The training loop: resume equivalence, accumulation, interruption, early stopping, artefacts."""

from __future__ import annotations

import json

import pytest
import torch
from tiny_models import tiny_chat_model_and_tokenizer

from tuneforge.config import parse_train_config
from tuneforge.errors import ConfigError
from tuneforge.train import train
from tuneforge.train.checkpoint import list_checkpoints


def config(tmp_path, name="run", **training):
    settings = {"max_steps": 6, "batch_size": 4, "lr": 5e-3, "log_every": 1, "save_every": 3, "seed": 7}
    settings.update(training)
    return parse_train_config({
        "output_dir": str(tmp_path / name),
        "adapter": {"r": 4, "dropout": 0.1},  # dropout makes RNG restoration matter
        "data": {"train": "arithmetic", "options": {"size": 48}, "max_seq_len": 192, "eval_size": 8},
        "training": settings,
    })


def run(cfg, **kwargs):
    losses = []
    summary = train(cfg, model_and_tokenizer=tiny_chat_model_and_tokenizer(), on_step=lambda s, loss: losses.append(loss), **kwargs)
    return summary, losses


def test_resume_matches_uninterrupted_run(tmp_path):
    _, full = run(config(tmp_path, "full"))

    def stop_after_four(step, loss):
        if step == 4:
            raise KeyboardInterrupt  # what Ctrl-C raises

    partial = config(tmp_path, "partial")
    first = train(partial, model_and_tokenizer=tiny_chat_model_and_tokenizer(), on_step=stop_after_four)
    assert first.interrupted and first.steps == 4
    assert [p.name for p in list_checkpoints(first.run_dir)] == ["step-0000003", "step-0000004"]
    resumed_losses = []
    second = train(partial, resume=True, model_and_tokenizer=tiny_chat_model_and_tokenizer(),
                   on_step=lambda s, loss: resumed_losses.append(loss))
    assert second.steps == 6
    assert resumed_losses == pytest.approx(full[4:], rel=1e-5, abs=1e-6)
    records = [json.loads(line) for line in (second.run_dir / "metrics.jsonl").read_text().splitlines()]
    train_steps = [r["step"] for r in records if "train_loss" in r]
    assert train_steps == [1, 2, 3, 4, 5, 6], "metrics.jsonl must hold each step once after a resume"


def test_gradient_accumulation_equals_one_big_batch(tmp_path):
    # The batch order is a shuffle of the same packed rows, so 2 micro-batches of 2 hold exactly the
    # rows of one batch of 4; without dropout both runs must take identical steps.
    big_cfg = config(tmp_path, "big", batch_size=4, max_steps=3, lr=1e-2)
    big_cfg.adapter.dropout = 0.0
    acc_cfg = config(tmp_path, "acc", batch_size=2, grad_accum=2, max_steps=3, lr=1e-2)
    acc_cfg.adapter.dropout = 0.0
    _, big = run(big_cfg)
    _, accumulated = run(acc_cfg)
    assert accumulated == pytest.approx(big, rel=1e-4)


def test_run_directory_artefacts(tmp_path):
    summary, losses = run(config(tmp_path, eval_every=3))
    run_dir = summary.run_dir
    for name in ("config.yaml", "metrics.jsonl", "loss_curve.png", "summary.json", "adapter/adapter_config.json",
                 "adapter/adapter_model.safetensors", "adapter/README.md"):
        assert (run_dir / name).exists(), name
    assert any(p.name.startswith("events.out.tfevents") for p in (run_dir / "tensorboard").iterdir())
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "eval_loss" in r] == [0, 3, 6]
    assert summary.best_eval_loss == min(r["eval_loss"] for r in records if "eval_loss" in r)
    assert (run_dir / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert summary.tokens_per_second > 0 and summary.peak_memory_mb > 0


def test_training_lowers_eval_loss(tmp_path):
    summary, _ = run(config(tmp_path, max_steps=20, lr=2e-2, eval_every=10, save_every=None))
    records = [json.loads(line) for line in (summary.run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [r["eval_loss"] for r in records if "eval_loss" in r]
    assert evals[-1] < evals[0]


def test_early_stopping(tmp_path):
    # A learning rate this large makes eval loss worse after the first evaluation.
    summary, _ = run(config(tmp_path, max_steps=40, lr=5.0, eval_every=2, early_stopping_patience=2,
                            save_every=None, max_grad_norm=None))
    assert summary.steps < 40


def test_existing_run_is_not_clobbered(tmp_path):
    cfg = config(tmp_path, max_steps=1)
    run(cfg)
    with pytest.raises(ConfigError, match="already holds a run.*--resume.*--overwrite"):
        run(cfg)
    summary, _ = run(cfg, overwrite=True)
    assert summary.steps == 1


def test_gradient_checkpointing_and_bf16_train_the_adapter(tmp_path):
    summary, losses = run(config(tmp_path, max_steps=3, gradient_checkpointing=True, precision="bf16", save_every=None))
    assert summary.steps == 3 and all(torch.isfinite(torch.tensor(losses)))
    from safetensors.torch import load_file

    tensors = load_file(str(summary.adapter_dir / "adapter_model.safetensors"))
    b_norm = sum(float(t.abs().sum()) for k, t in tensors.items() if "lora_B" in k)
    assert b_norm > 0, "no gradient reached the adapters through checkpointed layers"


def test_compiled_layers_take_the_same_steps_as_eager(tmp_path):
    eager_cfg = config(tmp_path, "eager", max_steps=3, save_every=None)
    eager_cfg.adapter.dropout = 0.0
    compiled_cfg = config(tmp_path, "compiled", max_steps=3, save_every=None, compile=True)
    compiled_cfg.adapter.dropout = 0.0
    _, eager = run(eager_cfg)
    _, compiled = run(compiled_cfg)
    assert compiled == pytest.approx(eager, rel=1e-4)


def test_qlora_training_quantizes_the_base_and_trains_the_adapter(tmp_path):
    from tuneforge.quant import QuantLinear

    cfg = config(tmp_path, max_steps=8, lr=2e-2, eval_every=8, save_every=None)
    cfg.quantization = {"bits": 4, "type": "nf4", "double_quant": True, "compute_dtype": "float32"}
    model, tokenizer = tiny_chat_model_and_tokenizer()
    summary = train(cfg, model_and_tokenizer=(model, tokenizer))
    assert any(isinstance(m, QuantLinear) for m in model.modules())
    records = [json.loads(line) for line in (summary.run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [r["eval_loss"] for r in records if "eval_loss" in r]
    assert evals[-1] < evals[0]


def test_bad_quantization_settings_are_config_errors():
    with pytest.raises(ConfigError, match="quantization.type='nf5'"):
        parse_train_config({"quantization": {"type": "nf5"}})


def test_quantized_compute_dtype_auto_is_float32_on_cpu(tmp_path):
    from tuneforge.quant import QuantLinear

    cfg = config(tmp_path, max_steps=1, save_every=None)
    cfg.quantization = {"bits": 4}
    assert cfg.quantization.compute_dtype == "auto"
    model, tokenizer = tiny_chat_model_and_tokenizer()
    train(cfg, model_and_tokenizer=(model, tokenizer))
    dtypes = {m.compute_dtype for m in model.modules() if isinstance(m, QuantLinear)}
    assert dtypes == {torch.float32}
