"""SLoRA: stage 1 sends only the masked entries of a shared random mask; stage 2's LoRA starts at the
rank-r truncated SVD of stage 1's accumulated sparse update (numpy's SVD here, on ΔW taken from the
SHiRA layers' own delta_weight)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from flower_helpers import saved_tiny_model
from tiny_models import tiny_chat_model_and_tokenizer

pytest.importorskip("flwr")

from flwr.app import ConfigRecord, Context, Message, RecordDict  # noqa: E402

from tuneforge.adapters import add_adapter  # noqa: E402
from tuneforge.adapters.model import wrapped_layers  # noqa: E402
from tuneforge.adapters.peft_format import fill_adapter_weights  # noqa: E402
from tuneforge.errors import ConfigError  # noqa: E402
from tuneforge.federated import slora  # noqa: E402
from tuneforge.federated.apps import client_train, from_record, to_record  # noqa: E402
from tuneforge.federated.config import parse_federated_config  # noqa: E402
from tuneforge.federated.updates import state_arrays  # noqa: E402

TARGETS = ["q_proj", "v_proj", "down_proj"]


def raw_config(tmp_path, density=0.05):
    return {
        "model": saved_tiny_model(tmp_path), "output_dir": str(tmp_path / "unused"),
        "adapter": {"method": "lora", "r": 2, "alpha": 6, "target_modules": TARGETS},
        "data": {"train": "arithmetic", "options": {"size": 16}, "max_seq_len": 96, "eval_size": 0},
        "training": {"max_steps": 2, "batch_size": 4, "lr": 0.01, "warmup_steps": 0},
        "federated": {"clients": 2, "rounds": 3, "method": "slora", "slora_sparse_rounds": 1,
                      "slora_density": density},
    }


def test_stage_one_client_sends_only_the_masked_entries(tmp_path):
    raw = raw_config(tmp_path)
    stage = slora.sparse_stage_config(raw, density=0.05, seed=0)
    config, _ = parse_federated_config(stage)
    model, _ = tiny_chat_model_and_tokenizer()
    add_adapter(model, config.adapter, "default")
    sent = state_arrays(model, "default")  # zero values, the shared mask's indices
    content = RecordDict({"arrays": to_record(sent),
                          "config": ConfigRecord({"tuneforge-config": json.dumps(stage), "server-round": 1})})
    context = Context(run_id=1, node_id=0, state=RecordDict(), run_config={},
                      node_config={"partition-id": 0, "num-partitions": 2, "workdir": str(tmp_path / "clients")})
    upload = from_record(client_train(Message(content, dst_node_id=0, message_type="train"), context).content["arrays"])

    layers = {name: layer.base_layer for name, layer in wrapped_layers(model)}
    assert {key.rsplit(".", 1)[0] for key in upload} == {f"base_model.model.{name}" for name in layers}
    assert all(key.endswith(".shira_weight") for key in upload)  # values only: the mask never travels
    for name, base in layers.items():
        values = upload[f"base_model.model.{name}.shira_weight"]
        assert values.size == round(0.05 * base.weight.numel())  # d·out·in entries, nothing else
    assert sum(v.size for v in upload.values()) < 0.06 * sum(b.weight.numel() for b in layers.values())
    assert any(np.abs(v).max() > 0 for v in upload.values())  # and they trained


def test_stage_two_lora_is_the_truncated_svd_of_the_stage_one_delta(tmp_path):
    raw = raw_config(tmp_path, density=0.3)
    sparse_config, _ = parse_federated_config(slora.sparse_stage_config(raw, density=0.3, seed=0))
    lora_config, _ = parse_federated_config(slora.lora_stage_config(raw))
    sparse_model, _ = tiny_chat_model_and_tokenizer()
    add_adapter(sparse_model, sparse_config.adapter, "default")
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():  # a stage-1 result: every kept entry moved
        for _, layer in wrapped_layers(sparse_model):
            weight = layer.adapters["default"].shira_weight
            weight.copy_(torch.randn(weight.shape, generator=generator))
    lora_model, _ = tiny_chat_model_and_tokenizer()
    torch.manual_seed(0)
    add_adapter(lora_model, lora_config.adapter, "default")

    initial = slora.svd_lora_init(state_arrays(sparse_model, "default"), state_arrays(lora_model, "default"),
                                  slora.lora_scalings(lora_model, "default"))
    fill_adapter_weights(lora_model, "default", {k: torch.from_numpy(v) for k, v in initial.items()}, "<svd init>")

    sparse_layers = dict(wrapped_layers(sparse_model))
    for name, layer in wrapped_layers(lora_model):
        stage_one = sparse_layers[name]
        delta = stage_one.adapters["default"].delta_weight(stage_one.base_layer).detach().double().numpy()  # (out, in)
        u, s, vt = np.linalg.svd(delta)
        truncated = (u[:, :2] * s[:2]) @ vt[:2]
        assert s[2] > 1e-3 * s[0]  # ΔW has rank above r: truncation really drops something
        lora = layer.adapters["default"]
        np.testing.assert_allclose(lora.scaling, 6 / 2)
        product = (lora.lora_B @ lora.lora_A).detach().double().numpy()
        np.testing.assert_allclose(product * lora.scaling, truncated, atol=1e-5)
        np.testing.assert_allclose(lora.delta_weight(layer.base_layer).detach().double().numpy(), truncated, atol=1e-5)


def test_slora_config_problems_are_named(tmp_path):
    raw = raw_config(tmp_path)
    raw["federated"]["rounds"] = 1
    with pytest.raises(ConfigError, match="federated.rounds=1 leaves no LoRA round"):
        parse_federated_config(raw)
    raw = raw_config(tmp_path)
    raw["adapter"] = {"method": "lora-fa", "r": 2}
    with pytest.raises(ConfigError, match="set adapter.method: lora"):
        parse_federated_config(raw)
