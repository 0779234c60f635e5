"""FedKSeed end to end in-process: two real ClientApp rounds on a tiny model, the server's strategy
aggregating their (seed, scalar) uploads, and the global model checked against replaying every
uploaded pair, one by one, with z drawn here from the seed (the paper's update, written again)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from flower_helpers import open_round, saved_tiny_model

pytest.importorskip("flwr")

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict  # noqa: E402

from tuneforge.errors import ConfigError  # noqa: E402
from tuneforge.federated import fedkseed  # noqa: E402
from tuneforge.federated.apps import (  # noqa: E402
    SeedReplayStrategy,
    _global_model,
    _load_global,
    client_train,
    content_bytes,
    from_record,
    to_record,
)
from tuneforge.federated.config import parse_federated_config  # noqa: E402

SEEDS = 64


def raw_config(tmp_path):
    return {
        "model": saved_tiny_model(tmp_path), "output_dir": str(tmp_path / "unused"), "device": "cpu", "dtype": "float32",
        "adapter": {"method": "full"},
        "update_rule": {"method": "mezo", "eps": 1e-3, "n_spsa": 2},
        "data": {"train": "arithmetic", "options": {"size": 24}, "max_seq_len": 96, "eval_size": 0},
        "training": {"max_steps": 3, "batch_size": 4, "lr": 1e-3, "warmup_steps": 0},
        "federated": {"clients": 2, "rounds": 1, "method": "fedkseed", "seeds": SEEDS},
    }


def train_message(raw, coefficients):
    content = RecordDict({"arrays": to_record({fedkseed.COEFFICIENTS: coefficients}),
                          "config": ConfigRecord({"tuneforge-config": json.dumps(raw), "server-round": 2})})
    return Message(content, dst_node_id=0, message_type="train")


def reply_of(content):
    return Message(content, dst_node_id=1, message_type="train")


def replay_pairs_by_hand(params, seeds, start, uploads, weights, n_spsa):
    """θ = θ_0 − Σ_j c_j z_j − Σ_k (n_k/n) Σ_t lr_t g_t z_{j_t} / n_spsa, each z drawn from its seed
    parameter by parameter, in float64."""
    theta = [p.detach().double().clone() for p in params]

    def move(seed, scale):
        generator = torch.Generator().manual_seed(seed)
        for i, p in enumerate(params):
            theta[i] -= scale * torch.randn(p.shape, generator=generator, dtype=torch.float32).double()

    for j in np.flatnonzero(start):
        move(seeds[j], float(start[j]))
    total = sum(weights)
    for upload, weight in zip(uploads, weights):
        for j, g, lr in zip(upload["seed-index"], upload["projected-grad"], upload["lr"]):
            move(seeds[int(j)], weight / total * float(lr) * float(g) / n_spsa)
    return theta


def test_global_model_after_a_round_is_the_replay_of_the_uploaded_pairs(tmp_path):
    raw = raw_config(tmp_path)
    config, settings = parse_federated_config(raw)
    seeds = fedkseed.candidate_seeds(settings.seed, SEEDS)
    start = np.zeros(SEEDS, np.float32)  # a global model already off θ_0: round 2 of a run
    start[[3, 17]] = [0.02, -0.01]

    replies = []
    for partition in range(2):
        context = Context(run_id=1, node_id=partition, state=RecordDict(), run_config={},
                          node_config={"partition-id": partition, "num-partitions": 2,
                                       "workdir": str(tmp_path / "clients")})
        replies.append(client_train(train_message(raw, start), context))
    uploads = [from_record(r.content["arrays"]) for r in replies]
    replies[1].content["metrics"]["num-examples"] *= 3  # unequal FedAvg weights, so weighting is checked
    for upload in uploads:  # 3 steps of 2 SPSA samples, each a (seed index, g, lr) entry
        assert set(upload) == {"seed-index", "projected-grad", "lr"} and len(upload["seed-index"]) == 6
        assert (upload["projected-grad"] != 0).all()
    for reply in replies:  # the whole serialised reply, metrics and framing included
        assert content_bytes(reply.content) < 20_000

    strategy = SeedReplayStrategy(seed_count=SEEDS, n_spsa=2, min_train_nodes=2, min_available_nodes=2)
    strategy.global_arrays = {fedkseed.COEFFICIENTS: start}
    strategy.rounds[2] = {"down_bytes": {}, "up_bytes": {}, "failures": [], "rejected": [], "clients": {}}
    arrays, _ = strategy.aggregate_train(2, [reply_of(r.content) for r in replies])
    coefficients = from_record(arrays)[fedkseed.COEFFICIENTS]

    loaded = _global_model(config, settings)  # what the server and clients evaluate
    params = [p for p in loaded.model.parameters() if p.requires_grad]
    weights = [r.content["metrics"]["num-examples"] for r in replies]
    expected = replay_pairs_by_hand(params, seeds, start, uploads, weights, n_spsa=2)
    _load_global(loaded.model, settings, {fedkseed.COEFFICIENTS: coefficients})
    moved = 0.0
    for param, want, before in zip(params, expected, _global_model(config, settings).model.parameters()):
        torch.testing.assert_close(param.detach().double(), want, rtol=0, atol=2e-6)
        moved = max(moved, float((param.detach() - before.detach()).abs().max()))
    assert moved > 1e-4  # the round changed the model: the comparison above can fail


def test_client_starts_from_the_replayed_global_model(tmp_path):
    """Client training from c: its model after the round is θ_0 − Σ c_j z_j minus its own pairs' steps."""
    from safetensors.torch import load_file

    raw = raw_config(tmp_path)
    raw["training"]["max_steps"] = 1
    config, settings = parse_federated_config(raw)
    seeds = fedkseed.candidate_seeds(settings.seed, SEEDS)
    start = np.zeros(SEEDS, np.float32)
    start[5] = 0.05
    context = Context(run_id=1, node_id=0, state=RecordDict(), run_config={},
                      node_config={"partition-id": 0, "num-partitions": 2, "workdir": str(tmp_path / "clients")})
    upload = from_record(client_train(train_message(raw, start), context).content["arrays"])
    params = [p for p in _global_model(config, settings).model.parameters() if p.requires_grad]
    expected = replay_pairs_by_hand(params, seeds, start, [upload], [1.0], n_spsa=2)
    saved = dict(load_file(str(next((tmp_path / "clients" / "client-0" / "run" / "model").glob("*.safetensors")))))
    names = [n for n, p in _global_model(config, settings).model.named_parameters() if p.requires_grad]
    for name, want in zip(names, expected):
        # ±ε perturbations leave float32 rounding behind on the client: tolerance above it
        torch.testing.assert_close(saved[name].double(), want, rtol=0, atol=1e-5)


def test_malformed_seed_uploads_are_rejected():
    strategy = SeedReplayStrategy(seed_count=SEEDS, n_spsa=1, min_train_nodes=1, min_available_nodes=1)
    strategy.global_arrays = {fedkseed.COEFFICIENTS: np.zeros(SEEDS, np.float32)}
    open_round(strategy)
    good = {"seed-index": np.array([1, 1, 4], np.int32), "projected-grad": np.array([2.0, 1.0, -3.0], np.float32),
            "lr": np.full(3, 0.5, np.float32)}
    out_of_range = {**good, "seed-index": np.array([1, SEEDS, 4], np.int32)}
    ragged = {**good, "lr": np.full(2, 0.5, np.float32)}
    tensor_shaped = {"layer.weight": np.ones((2, 2), np.float32)}

    def reply(arrays):
        return reply_of(RecordDict({"arrays": to_record(arrays), "metrics": MetricRecord({"num-examples": 4})}))

    arrays, _ = strategy.aggregate_train(1, [reply(good), reply(out_of_range), reply(ragged), reply(tensor_shaped)])
    coefficients = from_record(arrays)[fedkseed.COEFFICIENTS]
    want = np.zeros(SEEDS)
    want[1], want[4] = 0.5 * (2.0 + 1.0), 0.5 * -3.0
    np.testing.assert_allclose(coefficients, want, rtol=1e-6)
    reasons = [r["reason"] for r in strategy.rounds[1]["rejected"]]
    assert len(reasons) == 3 and "outside 0..63" in reasons[0] and "equally long" in reasons[1]


def test_fedkseed_config_names_what_it_needs(tmp_path):
    raw = {"model": "x", "adapter": {"method": "lora"}, "training": {"weight_decay": 0.1},
           "data": {"train": "arithmetic"}, "federated": {"method": "fedkseed"}}
    with pytest.raises(ConfigError) as caught:
        parse_federated_config(raw)
    message = str(caught.value)
    assert "adapter.method='lora'" in message and "update_rule.method='optimizer'" in message
    assert "training.weight_decay=0.1" in message


def test_the_bundled_fedkseed_example_is_a_valid_config():
    from tuneforge.config.overrides import load_config_file

    config, settings = parse_federated_config(load_config_file("examples/federated_fedkseed.yaml"))
    assert settings.method == "fedkseed" and config.adapter.method == "full" and settings.clients == 4
