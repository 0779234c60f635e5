"""ifd: Instruction-Following Difficulty (Li et al., "From Quantity to Quality: Boosting LLM
Performance with Self-Guided Data Selection for Instruction Tuning", NAACL 2024, arXiv:2308.12032).

    IFD(Q, A) = s(A | Q) / s(A)

with s the mean cross-entropy of the reply's tokens, conditioned on the instruction Q or not (the
paper's "conditioned answer score" over "direct answer score"). A high IFD means the instruction
helps the model little: the example is hard to follow, so worth training on. IFD >= 1 means the
instruction does not help at all (the paper filters these out as misaligned pairs): such examples
are ranked after all others here and kept only when the rest does not fill the budget.
"""

from __future__ import annotations

import numpy as np

from tuneforge.select.registry import StrategySpec, register_strategy
from tuneforge.select.selection import keep_best
from tuneforge.select.strategies.checks import require_instructions


def ifd_scores(pool, scorer) -> np.ndarray:
    conditioned, unconditioned = scorer.example_sequences(pool.examples)
    with_instruction = scorer.answer_scores(conditioned)[:, 0]
    without_instruction = scorer.answer_scores(unconditioned)[:, 0]
    return with_instruction / without_instruction


def select_by_ifd(pool, budget: int, context):
    scores = ifd_scores(pool, context.scorer())
    return keep_best(scores, budget, higher_is_better=True, label="IFD", eligible=scores < 1,
                     ineligible_reason="IFD >= 1: the instruction does not help predict this reply")


register_strategy(StrategySpec(
    "ifd", select_by_ifd, "highest instruction-following difficulty s(A|Q)/s(A) below 1 (Li et al. 2024)",
    uses_model=True, check=lambda pool, options: require_instructions(pool, "ifd")))
