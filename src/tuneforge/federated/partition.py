"""Splitting one pool of examples among clients: IID, or non-IID by a Dirichlet draw per label.

The Dirichlet split follows Hsu, Qi & Brown 2019 ("Measuring the Effects of Non-Identical Data
Distribution for Federated Visual Classification", arXiv:1909.06335, §3): for each label k draw
q_k ~ Dir(α·1) over the N clients and give client i the fraction q_k[i] of label k's examples.
α → ∞ approaches IID; α → 0 gives each label to a single client.

Partitions are pure functions of (labels, clients, α, seed): every client computes the same split
and keeps its own part, so no example leaves the process that owns it.
"""

from __future__ import annotations

import numpy as np

from tuneforge.errors import ConfigError


class PartitionError(ConfigError):
    """The data cannot be split as the config asks."""


def iid_partition(count: int, clients: int, seed: int) -> list[list[int]]:
    """Shuffle indices 0..count-1 and deal them into ``clients`` near-equal parts."""
    _check_enough(count, clients)
    order = np.random.default_rng(seed).permutation(count)
    return [sorted(part.tolist()) for part in np.array_split(order, clients)]


def dirichlet_partition(labels: list[str], clients: int, alpha: float, seed: int) -> list[list[int]]:
    """Hsu et al. 2019's label-skewed split; returns each client's example indices."""
    _check_enough(len(labels), clients)
    rng = np.random.default_rng(seed)
    parts: list[list[int]] = [[] for _ in range(clients)]
    for label in sorted(set(labels)):
        members = np.array([i for i, value in enumerate(labels) if value == label])
        members = members[rng.permutation(len(members))]
        shares = rng.dirichlet(np.full(clients, alpha))
        # cut points of the cumulative shares: client i gets members[cuts[i-1]:cuts[i]]
        cuts = np.round(np.cumsum(shares)[:-1] * len(members)).astype(int)
        for client, piece in enumerate(np.split(members, cuts)):
            parts[client].extend(piece.tolist())
    empty = [i for i, part in enumerate(parts) if not part]
    if empty:
        raise PartitionError(
            f"federated.partition=dirichlet with alpha={alpha} left client(s) {empty} with no examples "
            f"({len(labels)} examples, {len(set(labels))} label(s), {clients} clients); "
            "raise federated.alpha, use fewer clients or more data, or change federated.seed")
    return [sorted(part) for part in parts]


def _check_enough(count: int, clients: int) -> None:
    if clients > count:
        raise PartitionError(
            f"federated.clients={clients} asks for more clients than there are examples to give them ({count}); "
            "use fewer clients or more data (data.options.size)")
