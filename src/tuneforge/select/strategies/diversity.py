"""diversity: cover the data's clusters in embedding space, then reweight clusters by quality.

Yu, Chen, Ahmadian & Fadaee, "Diversify and Conquer: Diversity-Centric Data Selection with Iterative
Refinement" (ICLR 2025, arXiv:2409.11378): k-means on example embeddings; the budget is split across
clusters in proportion to their size (kMQ: k-means-quality, each cluster sampled by quality); the
iterative variant picks the budget in rounds and, after each round, reassesses every cluster's
weight from a signal of how useful its examples are, so low-quality clusters shrink.

Our choices: the first round gives every cluster one example before splitting the rest by size
(when the budget allows), so small clusters are represented. The quality signal is the base
model's mean reply loss (lower is better; no reward model and no training between rounds): after
each round, w_c <- w_c * exp(-z_c), with z_c the cluster's mean
loss over that round's picks, standardised across clusters. ``rounds=1`` is static kMQ, where each
cluster keeps its examples nearest the centre. ``method=kcenter`` instead takes the greedy k-center
cover (farthest-first; Sener & Savarese, arXiv:1708.00489), one example per centre.
Embeddings: ``embedder=hidden`` (the base model's mean last hidden state) or ``minilm``.
"""

from __future__ import annotations

import math

import numpy as np

from tuneforge.select.algorithms.clustering import allocate, k_center_greedy, kmeans, squared_distances
from tuneforge.select.registry import StrategySpec, register_strategy
from tuneforge.select.scoring.embeddings import EMBEDDERS, check_embedder_available, embed_pool
from tuneforge.select.selection import Selection
from tuneforge.select.strategies.checks import require_choice, require_positive_int

METHODS = ("kmeans", "kcenter")


def select_diverse(pool, budget: int, context) -> Selection:
    vectors = embed_pool(pool, context.option("embedder"), context)
    if context.option("method") == "kcenter":
        return _k_center_selection(vectors, budget)
    clusters = int(context.option("clusters")) or max(1, round(math.sqrt(budget)))
    labels, centres = kmeans(vectors, clusters, seed=context.seed)
    rounds = int(context.option("rounds"))
    quality = _reply_losses(pool, context) if rounds > 1 else None
    return kmeans_quality_pick(vectors, labels, centres, budget, rounds, quality)


def kmeans_quality_pick(vectors: np.ndarray, labels: np.ndarray, centres: np.ndarray, budget: int, rounds: int,
                        losses: np.ndarray | None) -> Selection:
    """Pick ``budget`` examples over ``rounds`` rounds, per-cluster quotas from size x weight."""
    k = len(centres)
    distance = squared_distances(vectors, centres)[np.arange(len(vectors)), labels]
    # Within a cluster: lowest reply loss first when there is a quality signal, else nearest the centre.
    order_key = losses if losses is not None else distance
    queues = [sorted(np.flatnonzero(labels == c), key=lambda i: (order_key[i], i)) for c in range(k)]
    weights = np.ones(k)
    picked: list[int] = []
    picked_round = {}
    for round_number in range(rounds):
        want = (budget - len(picked)) // (rounds - round_number)
        sizes = np.array([len(q) for q in queues])
        quotas = allocate(want, sizes, weights, at_least_one=round_number == 0)
        this_round = []
        for cluster, quota in enumerate(quotas):
            this_round += queues[cluster][:quota]
            queues[cluster] = queues[cluster][quota:]
        picked += this_round
        picked_round.update({i: round_number + 1 for i in this_round})
        if losses is not None and this_round:
            weights = _reweight(weights, labels, np.array(this_round), losses)
    kept = sorted(int(i) for i in picked)
    chosen = set(kept)
    sizes = np.bincount(labels, minlength=k)
    reasons = []
    for i in range(len(vectors)):
        where = f"cluster {labels[i] + 1} of {k} ({sizes[labels[i]]} examples, final weight {weights[labels[i]]:.3g})"
        reasons.append(f"kept in round {picked_round[i]}: {where}" if i in chosen
                       else f"dropped: its cluster's quota was filled by examples {'with lower reply loss' if losses is not None else 'nearer the centre'}; {where}")
    scores = losses if losses is not None else -np.sqrt(distance)
    name = "reply loss (nats/token)" if losses is not None else "minus the distance to the cluster centre"
    return Selection(kept, reasons, scores, name, details={"cluster_sizes": sizes.tolist(), "cluster_weights": weights.tolist()})


def _reweight(weights: np.ndarray, labels: np.ndarray, picked: np.ndarray, losses: np.ndarray) -> np.ndarray:
    clusters = np.unique(labels[picked])
    means = np.array([np.nanmean(losses[picked[labels[picked] == c]]) for c in clusters])
    spread = means.std()
    if spread <= 0 or not np.isfinite(spread):
        return weights
    updated = weights.copy()
    updated[clusters] *= np.exp(-(means - means.mean()) / spread)
    return updated


def _k_center_selection(vectors: np.ndarray, budget: int) -> Selection:
    order = k_center_greedy(vectors, budget)
    rank = {index: position for position, index in enumerate(order)}
    chosen = set(order)
    nearest = squared_distances(vectors, vectors[order]).min(1)
    reasons = [f"kept: centre {rank[i] + 1} of the greedy k-center cover" if i in chosen
               else f"dropped: within distance {np.sqrt(nearest[i]):.3g} of a chosen centre" for i in range(len(vectors))]
    return Selection(sorted(chosen), reasons, np.sqrt(nearest), "distance to the nearest kept example")


def _reply_losses(pool, context) -> np.ndarray:
    scorer = context.scorer()
    conditioned, _ = scorer.example_sequences(pool.examples)
    return scorer.answer_scores(conditioned)[:, 0]


def _check(pool, options) -> None:
    require_choice(options, "method", METHODS, "diversity")
    require_choice(options, "embedder", EMBEDDERS, "diversity")
    require_positive_int(options, "rounds", "diversity")
    require_positive_int(options, "clusters", "diversity", minimum=0)
    check_embedder_available(options["embedder"], "strategy=diversity")


register_strategy(StrategySpec(
    "diversity", select_diverse, "k-means (or k-center) cover of the embeddings with per-round cluster reweighting "
    "(Diversify and Conquer, arXiv:2409.11378)", uses_model=True, check=_check,
    options={"method": "kmeans", "embedder": "hidden", "clusters": 0, "rounds": 3}))
