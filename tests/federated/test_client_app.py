"""The ClientApp called in-process with a hand-built Flower message: it trains with tuneforge.train on
its own partition, starting from the global adapter, and sends back only what training changed."""

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
from tuneforge.adapters.peft_format import read_adapter_tensors  # noqa: E402
from tuneforge.federated.apps import client_evaluate, client_train, from_record, to_record  # noqa: E402
from tuneforge.federated.config import parse_federated_config  # noqa: E402
from tuneforge.federated.updates import state_arrays  # noqa: E402


def raw_config(tmp_path):
    return {
        "model": saved_tiny_model(tmp_path), "output_dir": str(tmp_path / "unused"),
        "adapter": {"method": "lora-fa", "r": 4, "target_modules": ["q_proj", "v_proj"]},
        "data": {"train": "arithmetic", "options": {"size": 30}, "max_seq_len": 128, "eval_size": 4},
        "training": {"max_steps": 2, "batch_size": 4, "lr": 0.01, "warmup_steps": 0},
        "federated": {"clients": 3, "rounds": 1, "method": "ffa-lora", "partition": "dirichlet", "alpha": 1.0,
                      "label_by": "answer"},
    }


def global_adapter(raw):
    config, _ = parse_federated_config(raw)
    model, _ = tiny_chat_model_and_tokenizer()
    torch.manual_seed(123)
    add_adapter(model, config.adapter, "default")
    arrays = state_arrays(model, "default")
    for key in arrays:  # a global B already off zero, so "starts from the global adapter" is checkable
        if key.endswith("lora_B.weight"):
            arrays[key] = np.full_like(arrays[key], 0.01)
    return arrays


def message(raw, arrays, kind):
    content = RecordDict({"arrays": to_record(arrays),
                          "config": ConfigRecord({"tuneforge-config": json.dumps(raw), "server-round": 1})})
    return Message(content, dst_node_id=0, message_type=kind)


def test_ffa_lora_client_trains_from_the_global_adapter_and_sends_b_only(tmp_path):
    raw = raw_config(tmp_path)
    sent = global_adapter(raw)
    context = Context(run_id=1, node_id=0, node_config={"partition-id": 1, "num-partitions": 3,
                                                          "workdir": str(tmp_path / "clients")},
                      state=RecordDict(), run_config={})
    reply = client_train(message(raw, sent, "train"), context)
    update = from_record(reply.content["arrays"])
    assert set(update) == {k for k in sent if k.endswith("lora_B.weight")}  # A is frozen and never sent
    assert all(not np.allclose(update[k], sent[k]) for k in update)  # training moved B
    saved = read_adapter_tensors(tmp_path / "clients" / "client-1" / "run" / "adapter")
    for key in sent:  # the client trained with the server's A, not the A of its own seeded init
        if key.endswith("lora_A.weight"):
            np.testing.assert_array_equal(saved[key].numpy(), sent[key])
    lines = (tmp_path / "clients" / "client-1" / "train.jsonl").read_text().splitlines()
    assert reply.content["metrics"]["num-examples"] == len(lines) > 0

    evaluated = client_evaluate(message(raw, sent, "evaluate"), context)
    assert evaluated.content["metrics"]["num-examples"] > 0
    assert np.isfinite(evaluated.content["metrics"]["eval-loss"])


def test_a_supernode_without_a_fitting_partition_fails_clearly(tmp_path):
    raw = raw_config(tmp_path)
    context = Context(run_id=1, node_id=0, node_config={"partition-id": 3, "num-partitions": 3},
                      state=RecordDict(), run_config={})
    with pytest.raises(Exception, match="partition-id=3 num-partitions=3 does not fit federated.clients=3"):
        client_train(message(raw, global_adapter(raw), "train"), context)


def test_a_client_with_data_of_its_own_trains_on_all_of_it(tmp_path):
    raw = raw_config(tmp_path)
    records = [{"messages": [{"role": "user", "content": f"{i} + 1?"}, {"role": "assistant", "content": str(i + 1)}]}
               for i in range(5)]
    (tmp_path / "mine.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    context = Context(run_id=1, node_id=0, node_config={"partition-id": 0, "num-partitions": 3,
                                                          "data": str(tmp_path / "mine.jsonl"),
                                                          "workdir": str(tmp_path / "clients")},
                      state=RecordDict(), run_config={})
    reply = client_train(message(raw, global_adapter(raw), "train"), context)
    assert reply.content["metrics"]["num-examples"] == 5  # the whole local file, not a share of the pool


def test_compressed_client_upload_is_the_comPEFT_code_of_its_change(tmp_path):
    from tuneforge.federated.updates import decompress_update

    raw = raw_config(tmp_path)
    raw["federated"]["compress_density"] = 0.5
    sent = global_adapter(raw)
    context = Context(run_id=1, node_id=0, node_config={"partition-id": 0, "num-partitions": 3,
                                                          "workdir": str(tmp_path / "clients")},
                      state=RecordDict(), run_config={})
    reply = client_train(message(raw, sent, "train"), context)
    upload = from_record(reply.content["arrays"])
    b_keys = {k for k in sent if k.endswith("lora_B.weight")}
    assert {k.rsplit("::", 1)[0] for k in upload} == b_keys
    decoded = decompress_update(upload, sent, {k: sent[k].shape for k in b_keys})
    saved = read_adapter_tensors(tmp_path / "clients" / "client-0" / "run" / "adapter")
    for key in b_keys:  # the decoded change keeps the trained change's signs where it kept an entry
        change, trained_change = decoded[key] - sent[key], saved[key].numpy() - sent[key]
        kept = change != 0
        assert kept.mean() == pytest.approx(0.5, abs=1 / change.size)
        assert (np.sign(change[kept]) == np.sign(trained_change[kept])).all()
    dense = sum(sent[k].nbytes for k in b_keys)
    assert sum(a.nbytes for a in upload.values()) * 10 <= dense
