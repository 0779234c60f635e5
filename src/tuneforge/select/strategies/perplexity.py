"""perplexity: rank replies by the base model's loss on them, given their instruction.

Score: s(A|Q) = -1/|A| sum_t log p(a_t | Q, a_<t), the mean cross-entropy of the reply's tokens
(perplexity = exp of it), the filter used e.g. by Marion et al., "When Less is More: Investigating
Data Pruning for Pretraining LLMs at Scale" (arXiv:2309.04564). ``keep=low`` (default) keeps the
replies the model finds most likely, which drops garbled and wrong ones; ``keep=high`` keeps the
surprising ones.
"""

from __future__ import annotations

from tuneforge.select.registry import StrategySpec, register_strategy
from tuneforge.select.selection import keep_best
from tuneforge.select.strategies.checks import require_choice

KEEP = ("low", "high")


def select_by_perplexity(pool, budget: int, context):
    scorer = context.scorer()
    conditioned, _ = scorer.example_sequences(pool.examples)
    losses = scorer.answer_scores(conditioned)[:, 0]
    return keep_best(losses, budget, higher_is_better=context.option("keep") == "high",
                     label="reply loss (nats/token)")


register_strategy(StrategySpec(
    "perplexity", select_by_perplexity, "the replies the base model finds most (keep=low) or least likely",
    uses_model=True, options={"keep": "low"},
    check=lambda pool, options: require_choice(options, "keep", KEEP, "perplexity")))
