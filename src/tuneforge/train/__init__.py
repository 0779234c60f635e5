"""Supervised finetuning: the loop, checkpoints, metrics and run directory."""

from tuneforge.train.loop import RunSummary, train

__all__ = ["RunSummary", "train"]
