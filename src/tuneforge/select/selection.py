"""What a strategy returns: which examples it kept, each one's score, and the reason for each decision."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from tuneforge.data import Example


@dataclass
class Selection:
    kept: list[int]                      # indices into the pool, ascending
    reasons: list[str]                   # one per pool example: why it was kept or dropped
    scores: np.ndarray | None = None     # one per pool example (nan: not scored)
    score_name: str = ""                 # what the score measures, with its direction
    # GRAPE rewrites examples (the chosen candidate becomes the reply); None: the pool's own examples.
    examples: list[Example] | None = None
    details: dict = field(default_factory=dict)  # e.g. dedup's clusters, timings of a pipeline's stages

    def kept_examples(self, pool_examples: list[Example]) -> list[Example]:
        source = self.examples if self.examples is not None else pool_examples
        return [source[i] for i in self.kept]


def keep_best(scores: np.ndarray, budget: int, *, higher_is_better: bool, label: str,
              eligible: np.ndarray | None = None, ineligible_reason: str = "") -> Selection:
    """Keep the ``budget`` best-scoring examples (ties broken by position, so results are stable).

    ``eligible`` (bool per example) ranks ineligible examples after every eligible one: they are
    kept only when the eligible ones do not fill the budget."""
    scores = np.asarray(scores, dtype=np.float64)
    n = len(scores)
    key = -scores if higher_is_better else scores.copy()
    key = np.where(np.isnan(key), np.inf, key)
    if eligible is not None:
        key = np.where(eligible, key, np.inf)
        order = np.lexsort((np.arange(n), key, ~eligible))
    else:
        order = np.lexsort((np.arange(n), key))
    rank = np.empty(n, dtype=np.int64)
    rank[order] = np.arange(n)
    kept = sorted(int(i) for i in order[:budget])
    direction = "highest" if higher_is_better else "lowest"
    reasons = []
    for i in range(n):
        verdict = "kept" if rank[i] < budget else "dropped"
        text = f"{verdict}: {label} {scores[i]:.4g}, rank {rank[i] + 1} of {n} ({direction} first, budget {budget})"
        if eligible is not None and not eligible[i]:
            text += f"; {ineligible_reason}"
        reasons.append(text)
    return Selection(kept, reasons, scores, f"{label} ({direction} kept)")
