"""Central DP of client updates: with σ = 0 every update is clipped to norm C (all its tensors together),
with σ > 0 the noise on the average has std σ·C/m; ε from the RDP bound, minimised here over α by brute
force instead of the closed form."""

from __future__ import annotations

import math

import numpy as np
import pytest
from flower_helpers import open_round, train_reply

pytest.importorskip("flwr")

from tuneforge.federated.accounting import gaussian_epsilon, privacy_report  # noqa: E402
from tuneforge.federated.apps import ScreenedFedAvg, from_record  # noqa: E402
from tuneforge.federated.config import PrivacySettings  # noqa: E402


def private_strategy(global_arrays, clipping_norm, noise_multiplier):
    expected = {key: value.shape for key, value in global_arrays.items()}
    strategy = ScreenedFedAvg(expected=expected, min_train_nodes=1, min_available_nodes=1,
                              privacy=PrivacySettings(clipping_norm=clipping_norm, noise_multiplier=noise_multiplier))
    strategy.global_arrays = dict(global_arrays)
    open_round(strategy)
    return strategy


def test_without_noise_each_update_is_clipped_to_the_norm_over_all_its_tensors():
    rng = np.random.default_rng(0)
    start = {"a.lora_A.weight": rng.normal(size=(4, 6)).astype(np.float32),
             "a.lora_B.weight": rng.normal(size=(5, 4)).astype(np.float32)}
    scales = [0.01, 3.0, 50.0]  # one update under the bound, two far over it
    clients = [{k: v + s * rng.normal(size=v.shape).astype(np.float32) for k, v in start.items()} for s in scales]
    strategy = private_strategy(start, clipping_norm=0.5, noise_multiplier=0.0)
    arrays, _ = strategy.aggregate_train(1, [train_reply(c, n) for c, n in zip(clients, (1, 5, 50))])
    merged = from_record(arrays)

    def clipped(update):
        norm = math.sqrt(sum(float(np.sum((update[k].astype(np.float64) - start[k]) ** 2)) for k in start))
        return {k: (update[k].astype(np.float64) - start[k]) * min(1.0, 0.5 / norm) for k in start}

    by_hand = [clipped(c) for c in clients]
    for key in start:  # equal weights whatever the example counts: each client's share is bounded
        np.testing.assert_allclose(merged[key] - start[key], sum(u[key] for u in by_hand) / 3, atol=1e-6)
    for update in by_hand:
        assert math.sqrt(sum(float(np.sum(t**2)) for t in update.values())) <= 0.5 + 1e-9
    total = math.sqrt(sum(float(np.sum((merged[k].astype(np.float64) - start[k]) ** 2)) for k in start))
    assert total <= 0.5 + 1e-6


def test_noise_on_the_average_has_std_sigma_c_over_m():
    size, clients, sigma, clip = 200_000, 4, 2.0, 0.3
    start = {"w": np.zeros(size, np.float32)}
    updates = [{"w": np.full(size, 1e-5, np.float32)} for _ in range(clients)]  # norm 0.0045: not clipped
    strategy = private_strategy(start, clipping_norm=clip, noise_multiplier=sigma)
    arrays, _ = strategy.aggregate_train(1, [train_reply(u) for u in updates])
    noise = from_record(arrays)["w"].astype(np.float64) - 1e-5
    expected_std = sigma * clip / clients
    # the sample std of 200k normals is within 1% of the true one with overwhelming probability
    assert noise.std() == pytest.approx(expected_std, rel=0.01)
    assert abs(noise.mean()) < 5 * expected_std / math.sqrt(size)
    assert strategy.rounds[1]["privacy"]["noise_std"] == pytest.approx(expected_std)


@pytest.mark.parametrize(("sigma", "rounds", "delta"), [(1.0, 1, 1e-5), (0.8, 10, 1e-6), (4.0, 50, 1e-5)])
def test_epsilon_is_the_rdp_bound_minimised_over_alpha(sigma, rounds, delta):
    alphas = 1 + np.geomspace(1e-4, 1e4, 400_001)
    by_search = np.min(rounds * alphas / (2 * sigma**2) + math.log(1 / delta) / (alphas - 1))
    assert gaussian_epsilon(sigma, rounds, delta) == pytest.approx(by_search, rel=1e-6)


def test_the_report_names_the_settings_and_says_when_there_is_no_guarantee():
    report = privacy_report(clipping_norm=1.0, noise_multiplier=1.0, delta=1e-5, rounds=3)
    assert report["clipping_norm"] == 1.0 and report["noise_multiplier"] == 1.0 and report["rounds"] == 3
    assert report["epsilon"] > gaussian_epsilon(1.0, 2, 1e-5)  # more rounds spend more privacy
    assert privacy_report(1.0, 0.0, 1e-5, 3)["epsilon"] is None  # no noise: no finite ε
