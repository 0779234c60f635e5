"""Data selection and curation: pick the training examples that matter.

    pool = load_pool("train.jsonl")                                    # or a bundled dataset name
    plan = plan_selection(pool, "dedup+length", budget=0.3)            # every check, no model yet
    result = run_selection(pool, plan, SelectContext(seed=0, load_scorer=...))
    write_selection(result, pool, "selected.jsonl", report_dir="report/")

Strategies (one module each in strategies/, registered in registry.py): random, dedup, length,
perplexity, ifd, el2n, diversity, grape, delift; join names with '+' for a pipeline.
"""

from tuneforge.select.budget import parse_budget, resolve_budget
from tuneforge.select.context import SelectContext
from tuneforge.select.pool import Pool, load_pool
from tuneforge.select.registry import StrategySpec, get_strategy, list_strategies, register_strategy
from tuneforge.select.run import SelectionPlan, SelectionResult, plan_selection, run_selection
from tuneforge.select.selection import Selection

__all__ = [
    "Pool",
    "SelectContext",
    "Selection",
    "SelectionPlan",
    "SelectionResult",
    "StrategySpec",
    "get_strategy",
    "list_strategies",
    "load_pool",
    "parse_budget",
    "plan_selection",
    "register_strategy",
    "resolve_budget",
    "run_selection",
]
