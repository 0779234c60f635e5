"""FedAvg and FFA-LoRA aggregation on real adapters, checked against ΔW = s·B·A written out here."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tiny_models import perturb_trainable, tiny_llama

from tuneforge.adapters import add_adapter
from tuneforge.adapters.config import LoraConfig
from tuneforge.adapters.rank.lora_fa import LoraFaConfig
from tuneforge.adapters.model import wrapped_layers
from tuneforge.adapters.peft_format import fill_adapter_weights
from tuneforge.federated.updates import state_arrays, trained_keys, update_problem, weighted_average

NAME = "default"


def client_models(config, count=3):
    """``count`` copies of one model with the same adapter init, each trained (perturbed) differently."""
    models = []
    for client in range(count):
        model = tiny_llama(0)
        torch.manual_seed(11)  # one shared init, as the server sends it
        add_adapter(model, config, NAME)
        perturb_trainable(model, scale=0.2, seed=100 + client)
        models.append(model)
    return models


def deltas(model):
    """Each adapted layer's ΔW = s · B · A, from the raw factors (not the library's delta_weight)."""
    out = {}
    for layer_name, layer in wrapped_layers(model):
        adapter = layer.adapters[NAME]
        out[layer_name] = (adapter.lora_B.detach().double() @ adapter.lora_A.detach().double()) * adapter.scaling
    return out


CONFIGS = [LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"])]


def global_model(config, merged):
    model = tiny_llama(0)
    add_adapter(model, config, NAME)
    fill_adapter_weights(model, NAME, {k: torch.from_numpy(v) for k, v in merged.items()}, "<test>")
    return model


def weighted_mean(per_client, weights):
    total = sum(weights)
    return {layer: sum(d[layer] * (w / total) for d, w in zip(per_client, weights)) for layer in per_client[0]}


def test_ffa_lora_aggregation_is_exact():
    config = LoraFaConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"])
    models = client_models(config)
    weights = [10.0, 30.0, 60.0]
    keys = trained_keys(models[0], NAME)
    assert keys and all(k.endswith("lora_B.weight") for k in keys)  # A is frozen: only B is sent
    merged = state_arrays(models[0], NAME)
    merged.update(weighted_average([state_arrays(m, NAME, keys) for m in models], weights))
    aggregated = deltas(global_model(config, merged))
    expected = weighted_mean([deltas(m) for m in models], weights)
    for layer in expected:
        assert torch.allclose(aggregated[layer], expected[layer], atol=1e-6), layer


def test_fedavg_of_lora_factors_is_not_the_average_update():
    config = CONFIGS[0]
    models = client_models(config)
    weights = [1.0, 1.0, 1.0]
    keys = trained_keys(models[0], NAME)
    assert any(k.endswith("lora_A.weight") for k in keys) and any(k.endswith("lora_B.weight") for k in keys)
    merged = weighted_average([state_arrays(m, NAME, keys) for m in models], weights)
    aggregated = deltas(global_model(config, merged))
    expected = weighted_mean([deltas(m) for m in models], weights)
    for layer_name, layer in wrapped_layers(models[0]):
        mean_b = sum(layer_of(m, layer_name).lora_B.detach().double() for m in models) / 3
        mean_a = sum(layer_of(m, layer_name).lora_A.detach().double() for m in models) / 3
        product_of_means = mean_b @ mean_a * layer.adapters[NAME].scaling
        assert torch.allclose(aggregated[layer_name], product_of_means, atol=1e-6)  # what FedAvg gives
        gap = (aggregated[layer_name] - expected[layer_name]).abs().max().item()
        assert gap > 1e-3 * expected[layer_name].abs().max().item()  # ... which is not the mean of B·A


def layer_of(model, layer_name):
    return dict(wrapped_layers(model))[layer_name].adapters[NAME]


def test_weighted_average_follows_example_counts():
    updates = [{"w": np.array([1.0, 2.0], np.float32)}, {"w": np.array([3.0, 6.0], np.float32)}]
    averaged = weighted_average(updates, [1, 3])
    np.testing.assert_allclose(averaged["w"], [(1 + 9) / 4, (2 + 18) / 4])


@pytest.mark.parametrize("update, reason", [
    ({"w": np.zeros((2, 3), np.float32)}, "shape (2, 3), expected (2, 2)"),
    ({"w": np.zeros((2, 2), np.float32), "x": np.zeros(1, np.float32)}, "unexpected ['x']"),
    ({}, "missing ['w']"),
    ({"w": np.array([[1, 2], [3, 4]])}, "expected a float array"),
    ({"w": np.array([[1.0, np.nan], [0.0, 0.0]], np.float32)}, "NaN"),
])
def test_malformed_updates_are_named(update, reason):
    problem = update_problem(update, {"w": (2, 2)})
    assert problem is not None and reason in problem


def test_well_formed_update_passes():
    assert update_problem({"w": np.zeros((2, 2), np.float32)}, {"w": (2, 2)}) is None


def test_compressed_upload_decodes_to_comPEFT_of_the_change():
    from tuneforge.federated.updates import compress_update, decompress_update

    rng = np.random.default_rng(0)
    reference = {"b": rng.normal(size=(8, 16)).astype(np.float32)}
    update = {"b": reference["b"] + rng.normal(size=(8, 16)).astype(np.float32)}
    sent = compress_update(update, reference, density=0.25)
    decoded = decompress_update(sent, reference, {"b": (8, 16)})
    # ComPEFT written out: keep the top 25% of |Δ|, replace each by sign · mean(|kept|)
    delta = (update["b"] - reference["b"]).reshape(-1)
    kept = np.argsort(-np.abs(delta))[: int(0.25 * delta.size)]
    expected = np.zeros_like(delta)
    expected[kept] = np.sign(delta[kept]) * np.abs(delta[kept]).mean()
    np.testing.assert_allclose(decoded["b"], reference["b"] + expected.reshape(8, 16), rtol=1e-6, atol=1e-6)
    dense_bytes = update["b"].nbytes
    assert sum(a.nbytes for a in sent.values()) * 10 <= dense_bytes  # 16 + 4 + 4 bytes against 512


@pytest.mark.parametrize("damage, reason", [
    (lambda sent: sent.pop("b::signs"), "signs of 0 bytes"),
    (lambda sent: sent.update({"b::mask": sent["b::mask"][:-1]}), "mask of 15 bytes, expected 16"),
    (lambda sent: sent.update({"c::mask": sent["b::mask"]}), "unexpected"),
    (lambda sent: sent.update({"b::scale": np.array([np.inf], np.float32)}), "one finite number"),
])
def test_malformed_compressed_uploads_are_refused(damage, reason):
    from tuneforge.federated.updates import compress_update, decompress_update

    reference = {"b": np.zeros((8, 16), np.float32)}
    sent = compress_update({"b": np.ones((8, 16), np.float32)}, reference, density=0.5)
    damage(sent)
    with pytest.raises(ValueError, match=reason):
        decompress_update(sent, reference, {"b": (8, 16)})
