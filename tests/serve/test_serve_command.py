"""`tuneforge serve`: arguments are checked before the model loads, and the app it builds answers."""

from __future__ import annotations

import argparse

import pytest
import torch
from fastapi.testclient import TestClient
from serve_helpers import chat_model, chat_tokenizer, save_all_adapters

from tuneforge.cli import main
from tuneforge.errors import ConfigError
from tuneforge.models import LoadedModel
from tuneforge.quant import QuantLinear, quantize_model
from tuneforge.serve import command


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    command.add_serve_arguments(parser)
    return parser.parse_args(list(argv))


@pytest.fixture
def fake_load(monkeypatch):
    tokenizer = chat_tokenizer()
    calls = []

    def load(name, *, dtype="auto", device="cpu", quantization=None):
        calls.append(name)
        model = chat_model(tokenizer)
        load.quantization = quantization
        if quantization is not None:  # as load_model does, on the tiny model
            quantize_model(model, **quantization)
        return LoadedModel(model, tokenizer, name, local_dir=None)

    monkeypatch.setattr(command, "load_model", load)
    load.calls, load.tokenizer, load.quantization = calls, tokenizer, None
    return load


def test_serve_builds_an_app_with_the_adapters_dir(fake_load, tmp_path, monkeypatch):
    save_all_adapters(fake_load.tokenizer, tmp_path)
    monkeypatch.setenv(command.API_KEY_VARIABLE, "from-env")
    app = command.build_app(_args("--model", "tiny", "--adapters-dir", str(tmp_path), "--max-batch-size", "2"))
    with TestClient(app) as client:
        headers = {"Authorization": "Bearer from-env"}
        ids = [m["id"] for m in client.get("/v1/models", headers=headers).json()["data"]]
        assert ids == ["tiny", "alpha", "beta", "gamma"]
        answer = client.post("/v1/completions", headers=headers,
                             json={"model": "beta", "prompt": "Hi", "max_tokens": 3, "temperature": 0})
        assert answer.status_code == 200
    assert app.state.service.engine.scheduler.max_batch_size == 2 and fake_load.calls == ["tiny"]


@pytest.mark.parametrize("argv, message", [
    (("--max-batch-size", "0"), "--max-batch-size 0 must be a positive integer"),
    (("--port", "70000"), "--port 70000"),
    (("--adapters-dir", "/nonexistent/adapters"), "is not a directory"),
    (("--finetune-share", "0"), "--finetune-share 0.0 must be in"),
    (("--finetune-share", "1.5"), "--finetune-share 1.5 must be in"),
    (("--finetune-slo-queue", "-1"), "--finetune-slo-queue -1 must be >= 0"),
])
def test_bad_arguments_fail_before_the_model_loads(fake_load, argv, message):
    with pytest.raises(ConfigError, match=message):
        command.build_app(_args(*argv))
    assert fake_load.calls == []


def test_the_cli_prints_the_error_instead_of_a_traceback(fake_load, capsys):
    assert main(["serve", "--max-queue", "0"]) == 2
    assert "--max-queue 0 must be a positive integer" in capsys.readouterr().err


def test_quantize_loads_the_base_quantized_and_serves_adapters_on_it(fake_load, tmp_path):
    save_all_adapters(fake_load.tokenizer, tmp_path)
    app = command.build_app(_args("--adapters-dir", str(tmp_path), "--quantize", "nf4", "--device", "cpu"))
    assert fake_load.quantization == {"bits": 4, "quant_type": "nf4", "compute_dtype": torch.float32}
    model = app.state.service.engine.model
    assert any(isinstance(module, QuantLinear) for module in model.modules())
    with TestClient(app) as client:
        answer = client.post("/v1/completions", json={"model": "gamma", "prompt": "Hi", "max_tokens": 3, "temperature": 0})
        assert answer.status_code == 200 and answer.json()["usage"]["completion_tokens"] >= 1


def test_without_quantize_the_base_loads_in_full_precision(fake_load):
    command.build_app(_args())
    assert fake_load.quantization is None


def test_a_bad_quantize_value_is_argparses_error_before_anything_loads(fake_load, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["serve", "--quantize", "nf5"])
    assert exit_info.value.code == 2 and fake_load.calls == []
    assert "argument --quantize: invalid choice: 'nf5'" in capsys.readouterr().err


def test_state_dir_turns_on_the_fine_tuning_routes_behind_the_admin_key(fake_load, tmp_path):
    app = command.build_app(_args("--model", "tiny", "--state-dir", str(tmp_path / "state"), "--admin-key", "adm",
                                  "--api-key", "usr", "--finetune-share", "0.3"))
    with TestClient(app) as client:
        assert client.get("/v1/fine_tuning/jobs", headers={"Authorization": "Bearer usr"}).status_code == 403
        listed = client.get("/v1/fine_tuning/jobs", headers={"Authorization": "Bearer adm"})
        assert listed.status_code == 200 and listed.json()["data"] == []
    assert (tmp_path / "state" / "jobs").is_dir()
    assert command.build_app(_args("--model", "tiny")).state.service.adapters is None  # off by default
