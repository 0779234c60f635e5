"""k-means (Lloyd's algorithm with k-means++ seeding; Arthur & Vassilvitskii 2007) and greedy
k-center (Gonzalez 1985: farthest-first traversal, a 2-approximation of the minimax radius).

Both work on unit vectors given as an (n, d) float array and are seeded, so a selection is repeatable.
"""

from __future__ import annotations

import numpy as np


def squared_distances(points: np.ndarray, centres: np.ndarray) -> np.ndarray:
    """(n, k) squared Euclidean distances, computed as |x|^2 - 2 x.c + |c|^2 without an (n, k, d) array."""
    d2 = (points ** 2).sum(1)[:, None] - 2 * points @ centres.T + (centres ** 2).sum(1)[None, :]
    return np.maximum(d2, 0.0)


def kmeans(points: np.ndarray, k: int, seed: int = 0, iterations: int = 50) -> tuple[np.ndarray, np.ndarray]:
    """(labels (n,), centres (k, d)). Empty clusters are re-seeded at the point farthest from its centre."""
    points = np.asarray(points, dtype=np.float64)
    n = len(points)
    k = max(1, min(k, n))
    rng = np.random.default_rng(seed)
    centres = _kmeans_plus_plus(points, k, rng)
    labels = np.full(n, -1)
    for _ in range(iterations):
        distances = squared_distances(points, centres)
        new_labels = distances.argmin(1)
        if np.array_equal(new_labels, labels):
            break
        labels = new_labels
        for cluster in range(k):
            members = points[labels == cluster]
            if len(members):
                centres[cluster] = members.mean(0)
            else:
                farthest = int(distances[np.arange(n), labels].argmax())
                centres[cluster] = points[farthest]
    return labels, centres


def _kmeans_plus_plus(points: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    centres = [points[rng.integers(len(points))]]
    closest = squared_distances(points, np.array(centres))[:, 0]
    for _ in range(1, k):
        total = closest.sum()
        index = rng.choice(len(points), p=closest / total) if total > 0 else rng.integers(len(points))
        centres.append(points[index])
        closest = np.minimum(closest, squared_distances(points, points[index][None])[:, 0])
    return np.array(centres)


def k_center_greedy(points: np.ndarray, budget: int, first: int | None = None) -> list[int]:
    """Farthest-first traversal: start at ``first`` (default: the point nearest the mean), then
    repeatedly add the point farthest from everything chosen so far."""
    points = np.asarray(points, dtype=np.float64)
    if first is None:
        first = int(squared_distances(points, points.mean(0, keepdims=True))[:, 0].argmin())
    chosen = [first]
    nearest = squared_distances(points, points[first][None])[:, 0]
    while len(chosen) < min(budget, len(points)):
        index = int(nearest.argmax())
        chosen.append(index)
        nearest = np.minimum(nearest, squared_distances(points, points[index][None])[:, 0])
    return chosen


def allocate(budget: int, sizes: np.ndarray, weights: np.ndarray, at_least_one: bool = False) -> np.ndarray:
    """Split ``budget`` across clusters in proportion to size x weight (largest remainder), never
    giving a cluster more than it holds; what a full cluster cannot take goes to the others.
    ``at_least_one``: when the budget allows, every non-empty cluster first gets one example, so a
    small cluster is represented however large the others are."""
    sizes = np.asarray(sizes, dtype=np.int64)
    quotas = np.zeros_like(sizes)
    remaining = min(budget, int(sizes.sum()))
    if at_least_one and remaining >= int((sizes > 0).sum()):
        quotas = (sizes > 0).astype(np.int64)
        remaining -= int(quotas.sum())
    while remaining > 0:
        room = sizes - quotas
        share = np.where(room > 0, sizes * np.asarray(weights, dtype=np.float64), 0.0)
        if share.sum() <= 0:
            share = (room > 0).astype(np.float64)
        exact = remaining * share / share.sum()
        grant = np.minimum(np.floor(exact).astype(np.int64), room)
        leftover = remaining - int(grant.sum())
        order = np.argsort(-(exact - np.floor(exact)), kind="stable")
        for cluster in order:
            if leftover == 0:
                break
            if grant[cluster] < room[cluster]:
                grant[cluster] += 1
                leftover -= 1
        if grant.sum() == 0:  # every cluster with a share is full: spread over those with room
            grant[np.flatnonzero(room > 0)[:remaining]] = 1
        quotas += grant
        remaining -= int(grant.sum())
    return quotas
