"""The server's strategy on hand-built replies: malformed or wrong-shaped updates are rejected, not
averaged; failed clients are logged; bytes are counted from the serialised messages."""

from __future__ import annotations

import numpy as np
import pytest
from flower_helpers import open_round, train_reply

pytest.importorskip("flwr")

from tuneforge.config.overrides import load_config_file  # noqa: E402
from tuneforge.federated.apps import ScreenedFedAvg, content_bytes, from_record  # noqa: E402
from tuneforge.federated.config import parse_federated_config  # noqa: E402
from tuneforge.federated.launch import _check_partitions  # noqa: E402
from tuneforge.federated.partition import PartitionError  # noqa: E402


EXPECTED = {"layer.lora_B.weight": (3, 2)}


def strategy(min_replies=1, privacy=None):
    screened = ScreenedFedAvg(expected=EXPECTED, min_train_nodes=min_replies, min_available_nodes=1, privacy=privacy)
    screened.global_arrays = {"layer.lora_A.weight": np.ones((2, 4), np.float32),
                              "layer.lora_B.weight": np.zeros((3, 2), np.float32)}
    open_round(screened)
    return screened


def test_wrong_shaped_and_non_finite_updates_are_not_averaged():
    good_1 = {"layer.lora_B.weight": np.full((3, 2), 1.0, np.float32)}
    good_2 = {"layer.lora_B.weight": np.full((3, 2), 4.0, np.float32)}
    wrong_shape = {"layer.lora_B.weight": np.full((2, 3), 1e6, np.float32)}
    poisoned = {"layer.lora_B.weight": np.full((3, 2), np.inf, np.float32)}
    screened = strategy()
    arrays, _ = screened.aggregate_train(1, [train_reply(good_1, 10), train_reply(wrong_shape), train_reply(good_2, 30), train_reply(poisoned)])
    merged = from_record(arrays)
    np.testing.assert_allclose(merged["layer.lora_B.weight"], (1.0 * 10 + 4.0 * 30) / 40)
    np.testing.assert_array_equal(merged["layer.lora_A.weight"], 1.0)  # not sent back: kept as it was
    reasons = [r["reason"] for r in screened.rounds[1]["rejected"]]
    assert len(reasons) == 2 and "shape (2, 3)" in reasons[0] and "NaN or infinite" in reasons[1]


def test_a_round_with_too_few_usable_updates_stops_the_run():
    screened = strategy(min_replies=2)
    with pytest.raises(RuntimeError, match="only 1 usable update"):
        screened.aggregate_train(1, [train_reply({"layer.lora_B.weight": np.ones((3, 2), np.float32)}),
                                     train_reply({"layer.lora_B.weight": np.ones((9, 9), np.float32)})])


def test_privacy_clips_each_update_then_averages_with_equal_weights():
    from tuneforge.federated.config import PrivacySettings

    small = np.full((3, 2), 0.1, np.float32)  # norm 0.245: under the bound, kept as is
    large = np.full((3, 2), 10.0, np.float32)  # norm 24.5: scaled down to norm 1
    screened = strategy(privacy=PrivacySettings(clipping_norm=1.0, noise_multiplier=0.0))
    arrays, _ = screened.aggregate_train(1, [train_reply({"layer.lora_B.weight": small}, 1),
                                             train_reply({"layer.lora_B.weight": large}, 99)])
    clipped_large = large / np.linalg.norm(large)  # the global B is zero, so the update is the array itself
    np.testing.assert_allclose(from_record(arrays)["layer.lora_B.weight"], (small + clipped_large) / 2, rtol=1e-6)

    noisy = strategy(privacy=PrivacySettings(clipping_norm=1.0, noise_multiplier=2.0))
    arrays, _ = noisy.aggregate_train(1, [train_reply({"layer.lora_B.weight": small}), train_reply({"layer.lora_B.weight": large})])
    assert noisy.rounds[1]["privacy"]["noise_std"] == pytest.approx(2.0 * 1.0 / 2)
    assert not np.allclose(from_record(arrays)["layer.lora_B.weight"], (small + clipped_large) / 2)


def test_bytes_are_measured_from_the_serialised_content():
    small = content_bytes(train_reply({"w": np.zeros(10, np.float32) + 1}).content)
    large = content_bytes(train_reply({"w": np.zeros(10_010, np.float32) + 1}).content)
    # the extra float32 payload, plus a few bytes of longer protobuf length/shape varints
    assert 10_000 * 4 <= large - small <= 10_000 * 4 + 16


def test_example_config_parses_and_its_partition_fits():
    config, settings = parse_federated_config(load_config_file("examples/federated_lora.yaml"))
    assert settings.clients == 4 and settings.partition == "dirichlet"
    _check_partitions(config, settings)
    with pytest.raises(PartitionError, match="federated.clients=5000"):
        _check_partitions(config, settings.model_copy(update={"clients": 5000, "partition": "iid"}))


def test_compressed_replies_are_decoded_and_averaged_and_broken_ones_rejected():
    from tuneforge.federated.updates import compress_update

    screened = ScreenedFedAvg(expected=EXPECTED, min_train_nodes=1, min_available_nodes=1, compressed=True)
    screened.global_arrays = {"layer.lora_B.weight": np.zeros((3, 2), np.float32)}
    open_round(screened)
    good = compress_update({"layer.lora_B.weight": np.full((3, 2), 2.0, np.float32)}, screened.global_arrays, 1.0)
    broken = dict(good)
    broken["layer.lora_B.weight::mask"] = np.zeros(5, np.uint8)
    arrays, _ = screened.aggregate_train(1, [train_reply(good), train_reply(broken)])
    np.testing.assert_allclose(from_record(arrays)["layer.lora_B.weight"], 2.0)
    assert "mask of 5 bytes" in screened.rounds[1]["rejected"][0]["reason"]
