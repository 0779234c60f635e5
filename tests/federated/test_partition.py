"""Partitions and the federated config: every example to exactly one client, skew that follows α,
and clear errors before anything starts."""

from __future__ import annotations

from collections import Counter

import pytest

from tuneforge.errors import ConfigError
from tuneforge.federated.config import parse_federated_config
from tuneforge.federated.partition import PartitionError, dirichlet_partition, iid_partition


def assert_disjoint_cover(parts, count):
    flat = [i for part in parts for i in part]
    assert sorted(flat) == list(range(count))


def test_iid_partition_covers_everything_in_near_equal_parts():
    parts = iid_partition(103, 4, seed=0)
    assert_disjoint_cover(parts, 103)
    assert sorted(len(p) for p in parts) == [25, 26, 26, 26]
    assert parts == iid_partition(103, 4, seed=0)  # every client computes the same split
    assert parts != iid_partition(103, 4, seed=1)


def label_share_spread(parts, labels):
    """Mean over clients of the largest label's share: 1/labels for IID, 1.0 for one label each."""
    shares = []
    for part in parts:
        counts = Counter(labels[i] for i in part)
        shares.append(max(counts.values()) / len(part))
    return sum(shares) / len(shares)


def test_dirichlet_partition_skews_with_small_alpha():
    labels = ["a"] * 200 + ["b"] * 200
    skewed = dirichlet_partition(labels, 4, alpha=0.1, seed=0)
    mixed = dirichlet_partition(labels, 4, alpha=100.0, seed=0)
    assert_disjoint_cover(skewed, 400)
    assert_disjoint_cover(mixed, 400)
    assert label_share_spread(mixed, labels) < 0.6  # close to the 0.5 of an even mix
    assert label_share_spread(skewed, labels) > 0.85  # each client mostly one task


def test_more_clients_than_examples_is_a_clear_error():
    with pytest.raises(PartitionError, match="federated.clients=5 .* more clients than there are examples .*3"):
        iid_partition(3, 5, seed=0)
    with pytest.raises(PartitionError, match="federated.clients=5"):
        dirichlet_partition(["a", "b", "a"], 5, alpha=1.0, seed=0)


def test_dirichlet_that_leaves_a_client_empty_says_what_to_change():
    labels = ["a"] * 3 + ["b"] * 3
    with pytest.raises(PartitionError, match="no examples.*raise federated.alpha"):
        for seed in range(50):  # tiny α on six examples: some seed leaves a client empty
            dirichlet_partition(labels, 4, alpha=0.01, seed=seed)


def test_config_needs_its_section_and_names_bad_keys():
    with pytest.raises(ConfigError, match="needs a `federated:` section"):
        parse_federated_config({"model": "x"})
    with pytest.raises(ConfigError, match="federated.cleints"):
        parse_federated_config({"federated": {"cleints": 3}})
    with pytest.raises(ConfigError, match="adapter.method: lora-fa"):
        parse_federated_config({"federated": {"method": "ffa-lora"}})
    config, settings = parse_federated_config({"federated": {"method": "ffa-lora", "clients": 3},
                                               "adapter": {"method": "lora-fa", "r": 4}})
    assert settings.clients == 3 and config.adapter.method == "lora-fa"
