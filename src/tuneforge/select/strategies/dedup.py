"""dedup: drop exact and near-duplicate examples, keeping the first of each cluster.

Near-duplicates are found with MinHash signatures and LSH banding on normalised text
(algorithms/minhash.py), as in Lee et al., "Deduplicating Training Data Makes Language Models
Better" (ACL 2022, arXiv:2107.06499), which uses MinHash with a Jaccard threshold of 0.8 on 5-gram
shingles; we cluster around leaders rather than by transitive closure (see near_duplicate_clusters).
Templated data is lexically close: distinct bundled state_tracking problems reach Jaccard 0.9+, so
raise ``threshold`` (1.0: only texts equal after normalisation or with equal shingle signatures)
for such data. Each cluster is reported with its members. Dedup is a filter: without a budget it keeps
every cluster's first example and every unique one; with a smaller budget it keeps a seeded random
sample of those.
"""

from __future__ import annotations

import numpy as np

from tuneforge.errors import ConfigError
from tuneforge.select.algorithms.minhash import near_duplicate_clusters
from tuneforge.select.pool import instruction_text, response_text
from tuneforge.select.registry import StrategySpec, register_strategy
from tuneforge.select.selection import Selection

FIELDS = ("all", "instruction", "response")


def dedup_text(example, field: str) -> str:
    if field == "instruction":
        return instruction_text(example)
    if field == "response":
        return response_text(example)
    return f"{instruction_text(example)}\n{response_text(example)}"


def select_unique(pool, budget: int | None, context) -> Selection:
    texts = [dedup_text(e, context.option("field")) for e in pool.examples]
    clusters = near_duplicate_clusters(texts, threshold=float(context.option("threshold")),
                                       shingle_size=int(context.option("shingle_size")), seed=context.seed)
    duplicate_of = {member: cluster[0] for cluster in clusters for member in cluster[1:]}
    cluster_of = {member: number for number, cluster in enumerate(clusters) for member in cluster}
    unique = [i for i in range(len(pool)) if i not in duplicate_of]
    sampled = set(unique)
    if budget is not None and budget < len(unique):
        order = np.random.default_rng(context.seed).permutation(len(unique))
        sampled = {unique[i] for i in order[:budget]}
    reasons = []
    for i in range(len(pool)):
        if i in duplicate_of:
            size = len(clusters[cluster_of[i]])
            reasons.append(f"dropped: duplicate of example {duplicate_of[i] + 1} (cluster {cluster_of[i] + 1}, {size} members)")
        elif i not in sampled:
            reasons.append(f"dropped: unique, but not in the seeded sample of {budget}")
        elif i in cluster_of:
            reasons.append(f"kept: first of duplicate cluster {cluster_of[i] + 1} ({len(clusters[cluster_of[i]])} members)")
        else:
            reasons.append("kept: no duplicate found")
    return Selection(sorted(sampled), reasons, details={"clusters": clusters})


def _check(pool, options) -> None:
    if options["field"] not in FIELDS:
        raise ConfigError(f"strategy=dedup: option field={options['field']!r} is not one of {list(FIELDS)}")
    if not 0 < float(options["threshold"]) <= 1:
        raise ConfigError(f"strategy=dedup: option threshold={options['threshold']!r} must be a Jaccard similarity in (0, 1]")


register_strategy(StrategySpec(
    "dedup", select_unique, "exact and near-duplicates (MinHash/LSH, Jaccard >= threshold) removed; clusters reported",
    needs_budget=False, options={"threshold": 0.8, "shingle_size": 5, "field": "all"}, check=_check))
