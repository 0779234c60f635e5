"""A tiny stream config and model for continual-learning tests."""

from __future__ import annotations

from tiny_models import tiny_chat_model_and_tokenizer


def stream_config(tmp_path, method=None, tasks=("unit_conversion", "string_reversal"), **overrides) -> dict:
    config = {
        "output_dir": str(tmp_path / "stream"),
        "tasks": [{"data": name} for name in tasks],
        "train_size": 16, "eval_size": 4, "max_new_tokens": 4,
        "method": method or {"name": "sequential"},
        "probe": {"data": "bundled", "size": 4},
        "train": {"adapter": {"r": 4}, "data": {"max_seq_len": 96},
                  "training": {"max_steps": 3, "batch_size": 4, "lr": 1e-2, "log_every": 100}},
    }
    config.update(overrides)
    return config


def tiny():
    return tiny_chat_model_and_tokenizer()


def quiet(_message: str) -> None:
    pass
