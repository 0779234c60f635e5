"""random: a seeded uniform sample, the baseline every other strategy must beat."""

from __future__ import annotations

import numpy as np

from tuneforge.select.registry import StrategySpec, register_strategy
from tuneforge.select.selection import Selection


def select_random(pool, budget: int, context) -> Selection:
    order = np.random.default_rng(context.seed).permutation(len(pool))
    kept = sorted(int(i) for i in order[:budget])
    chosen = set(kept)
    reasons = [f"kept: in a seeded random sample of {budget} (seed {context.seed})" if i in chosen
               else f"dropped: not in a seeded random sample of {budget} (seed {context.seed})" for i in range(len(pool))]
    return Selection(kept, reasons)


register_strategy(StrategySpec("random", select_random, "a seeded uniform random sample (the baseline)"))
