"""A tiny stream config and model for continual-learning tests."""

from __future__ import annotations

from tiny_models import tiny_chat_model_and_tokenizer


def stream_config(tmp_path, method=None, tasks=("unit_conversion", "string_reversal"), **overrides) -> dict:
    config = {
        "output_dir": str(tmp_path / "stream"),
        "tasks": [{"data": name} for name in tasks],
        "train_size": 8, "eval_size": 2, "max_new_tokens": 2,
        "method": method or {"name": "sequential"},
        "probe": {"data": "bundled", "size": 2},
        # A constant rate: with a decaying schedule the last of a few steps would barely move.
        "train": {"adapter": {"r": 4}, "data": {"max_seq_len": 96},
                  "training": {"max_steps": 2, "batch_size": 4, "lr": 1e-2, "log_every": 100,
                               "scheduler": "constant", "warmup_steps": 0}},
    }
    config.update(overrides)
    return config


def tiny():
    return tiny_chat_model_and_tokenizer()


def quiet(_message: str) -> None:
    pass
