"""Evaluation: loss/perplexity on a dataset and generation scoring on tasks with checkable answers."""

from tuneforge.eval.loss import evaluate_loss

__all__ = ["evaluate_loss"]
