"""length: keep the examples with the longest replies.

Shen, "Rethinking Data Selection for Supervised Fine-Tuning" (arXiv:2402.06094, 2024): choosing the
instructions with the longest responses beat quality- and diversity-based selection for
instruction following. The score is the reply's length in characters (no tokenizer needed).
"""

from __future__ import annotations

import numpy as np

from tuneforge.select.pool import response_text
from tuneforge.select.registry import StrategySpec, register_strategy
from tuneforge.select.selection import keep_best


def select_longest(pool, budget: int, context):
    lengths = np.array([len(response_text(e)) for e in pool.examples], dtype=np.float64)
    return keep_best(lengths, budget, higher_is_better=True, label="reply length (characters)")


register_strategy(StrategySpec("length", select_longest, "the longest replies (Shen 2024, arXiv:2402.06094)"))
