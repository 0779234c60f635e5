"""A real Flower deployment on loopback: SuperLink + SuperNodes as processes, the ClientApp training
with tuneforge.train, one SuperNode misconfigured so that its client crashes every round."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml
from tiny_models import save_tiny_chat_model, tiny_chat_model_and_tokenizer

pytest.importorskip("flwr")

from tuneforge.adapters import add_adapter  # noqa: E402
from tuneforge.config.overrides import load_config_file  # noqa: E402
from tuneforge.federated.config import parse_federated_config  # noqa: E402
from tuneforge.federated.launch import LocalFederation, write_flower_app  # noqa: E402
from tuneforge.federated.updates import state_arrays, trained_keys  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    return save_tiny_chat_model(tmp_path_factory.mktemp("tiny_model"))


def write_config(tmp_path, model_dir, **federated):
    config = {
        "model": str(model_dir), "output_dir": str(tmp_path / "run"),
        "adapter": {"method": "lora", "r": 4, "target_modules": ["q_proj", "v_proj"]},
        "data": {"train": "arithmetic", "options": {"size": 24}, "max_seq_len": 128, "eval_size": 8},
        "training": {"max_steps": 3, "batch_size": 4, "lr": 0.01, "log_every": 1, "warmup_steps": 0},
        "federated": {"clients": 2, "rounds": 1, "port": 19391, "accuracy_examples": 4, **federated},
    }
    path = tmp_path / "federated.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_loopback_round_survives_a_crashing_client_and_counts_bytes(tmp_path, tiny_model_dir):
    path = write_config(tmp_path, tiny_model_dir)
    config, settings = parse_federated_config(load_config_file(path))
    run_dir = tmp_path / "run"
    results = run_dir / "results.json"
    with LocalFederation(run_dir / "home", settings.port, settings.clients, run_dir, say=lambda _: None) as federation:
        federation.add_supernode(settings.clients, partition_id=7, partitions=settings.clients)  # crashes: no such part
        federation.run_app(write_flower_app(run_dir / "app"), {"config": str(path), "results": str(results)}, 900)
    outcome = json.loads(results.read_text())
    round_one = outcome["rounds"]["1"]
    assert len(round_one["clients"]) == 2  # the round completed with the two good clients
    assert len(round_one["failures"]) == 1 and "partition-id=7" in round_one["failures"][0]["reason"]
    assert outcome["global_eval_loss"]["1"] < outcome["global_eval_loss"]["0"]  # the averaged adapter learned
    # bytes up: at least the float32 tensors a client trains, plus Flower's framing (keys, headers, metrics)
    model, _ = tiny_chat_model_and_tokenizer()
    add_adapter(model, config.adapter, "default")
    raw = sum(a.nbytes for a in state_arrays(model, "default", trained_keys(model, "default")).values())
    for sent in round_one["up_bytes"].values():
        assert raw <= sent <= raw + 8192
    final = np.load(run_dir / "global_adapter.npz")
    assert not np.allclose(final[trained_keys(model, "default")[-1]], 0)  # B moved off its zero init
    assert torch.isfinite(torch.tensor(outcome["global_eval_loss"]["1"]))
    assert set(outcome["global_exact_match"]) == {"0", "1"}  # scored by generation before and after the round
    assert all(0.0 <= value <= 1.0 for value in outcome["global_exact_match"].values())
    assert {m["partition-id"] for m in round_one["client_eval"].values()} == {0, 1}  # each on its own data


def test_loopback_slora_runs_its_two_stages_and_counts_every_message(tmp_path, tiny_model_dir):
    path = write_config(tmp_path, tiny_model_dir, method="slora", rounds=2, slora_sparse_rounds=1,
                        slora_density=0.05, port=19421, accuracy_examples=0)
    _, settings = parse_federated_config(load_config_file(path))
    run_dir = tmp_path / "run"
    results = run_dir / "results.json"
    with LocalFederation(run_dir / "home", settings.port, settings.clients, run_dir, say=lambda _: None) as federation:
        federation.run_app(write_flower_app(run_dir / "app"), {"config": str(path), "results": str(results)}, 900)
    outcome = json.loads(results.read_text())
    assert set(outcome["global_eval_loss"]) == {"0", "1", "2"}  # stage 1 is round 1, stage 2 round 2
    assert "eval-loss" in outcome["stage_start"]["1"]  # the SVD-initialised LoRA, scored before stage 2
    sparse_round, lora_round = outcome["rounds"]["1"], outcome["rounds"]["2"]
    for record in (sparse_round, lora_round):  # training and evaluation messages, each client, both ways
        for kind in ("up_bytes", "down_bytes", "eval_up_bytes", "eval_down_bytes"):
            assert len(record[kind]) == 2 and all(b > 0 for b in record[kind].values()), kind
    # stage 1 sends 5% of q/v's entries as values; stage 2 the r=4 LoRA factors of the same layers
    for sent in sparse_round["up_bytes"].values():
        assert sent < min(lora_round["up_bytes"].values())
    final = np.load(run_dir / "global_adapter.npz")
    assert any(key.endswith("lora_A.weight") for key in final.files)
