"""Evaluation: loss/perplexity on a dataset and generation scoring on tasks with checkable answers.

`evaluate_models` runs both for a base model and any adapters side by side; the `tuneforge eval`
command (eval/command.py) is a thin layer over it.
"""

from tuneforge.eval.generation import (
    GenerationScore,
    contains,
    exact_match,
    generate_answers,
    normalize_answer,
    score_generation,
)
from tuneforge.eval.loss import evaluate_loss
from tuneforge.eval.report import METRICS, evaluate_models, render_table, to_markdown

__all__ = [
    "METRICS",
    "GenerationScore",
    "contains",
    "evaluate_loss",
    "evaluate_models",
    "exact_match",
    "generate_answers",
    "normalize_answer",
    "render_table",
    "score_generation",
    "to_markdown",
]
