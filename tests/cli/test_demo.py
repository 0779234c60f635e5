"""The demo's settings match examples/demo.yaml, and its whole path runs (on a tiny model here)."""

from __future__ import annotations

from pathlib import Path

import yaml
from tiny_models import tiny_chat_model_and_tokenizer

import tuneforge.models
from tuneforge.cli import main
from tuneforge.demo import DEMO_CONFIG

ROOT = Path(__file__).resolve().parents[2]


def test_demo_config_is_the_example_file():
    assert yaml.safe_load((ROOT / "examples" / "demo.yaml").read_text()) == DEMO_CONFIG


def test_example_configs_are_valid():
    from tuneforge.config import load_config_file, parse_train_config
    from tuneforge.continual.config import parse_continual_config
    from tuneforge.federated.config import parse_federated_config

    for path in sorted((ROOT / "examples").glob("*.yaml")):
        data = load_config_file(path)
        # A federated config is a training config plus its `federated:` section; a continual config holds a
        # stream (or tasks) and its training config under `train:`.
        parse = (parse_federated_config if "federated" in data else
                 parse_continual_config if "stream" in data or "tasks" in data else parse_train_config)
        parse(data, source=str(path))


def test_demo_runs_end_to_end_on_a_tiny_model(tmp_path, monkeypatch, capsys):
    model, tokenizer = tiny_chat_model_and_tokenizer()

    class Loaded:
        pass

    loaded = Loaded()
    loaded.model, loaded.tokenizer = model, tokenizer
    monkeypatch.setattr(tuneforge.models, "load_model", lambda *a, **k: loaded)
    code = main(["demo", "--eval-limit", "4", "--output-dir", str(tmp_path / "demo"), "training.max_steps=2",
                 "data.max_seq_len=192", "data.eval_size=4", "adapter.layers_to_transform=[1]"])
    out = capsys.readouterr().out
    assert code == 0
    assert "held-out accuracy" in out and "base + LoRA" in out
    assert (tmp_path / "demo" / "adapter" / "adapter_model.safetensors").exists()
    assert (tmp_path / "demo" / "loss_curve.png").exists()
