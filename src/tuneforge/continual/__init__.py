"""Continual finetuning: a stream of tasks trained in order, every task scored after each one.

    tuneforge continual examples/continual_sequential.yaml

config.py (the config), streams.py (bundled streams), tasks.py (load and check tasks), runner.py
(the stream: stages through train.train, R, resume), metrics.py (ACC, BWT, forgetting, FWT),
probe.py (general-ability drift), report.py (report.json, heatmap, per-task curves), methods/ (one
file per method plus a registry). See docs/continual.md.
"""

from tuneforge.continual.metrics import summarize
from tuneforge.continual.runner import run_continual

__all__ = ["run_continual", "summarize"]
