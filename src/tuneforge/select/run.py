"""Plan (every check, no model) then run a selection: one strategy, or a pipeline joined by '+'.

    plan = plan_selection(pool, "dedup+length+diversity", budget=0.3, options={"clusters": 20})
    result = run_selection(pool, plan, context)

In a pipeline each stage picks from what the previous one kept. Filters (dedup, GRAPE) keep what
they keep; other stages before the last keep twice the final budget (what is left of it), so the
last stage still has a choice; the last stage keeps the budget.
"""

from __future__ import annotations

import difflib
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tuneforge.errors import ConfigError
from tuneforge.select.budget import parse_budget, resolve_budget
from tuneforge.select.context import SelectContext
from tuneforge.select.pool import Pool
from tuneforge.select.registry import StrategySpec, get_strategy
from tuneforge.select.selection import Selection

PIPELINE_SEPARATOR = "+"
INTERMEDIATE_FACTOR = 2


@dataclass
class SelectionPlan:
    strategy: str
    stages: list[StrategySpec]
    budget: int | None
    options: dict[str, Any]

    @property
    def uses_model(self) -> bool:
        return any(stage.uses_model for stage in self.stages)


@dataclass
class StageTiming:
    strategy: str
    examples_in: int
    examples_out: int
    seconds: float

    @property
    def seconds_per_1k(self) -> float:
        return 1000 * self.seconds / max(1, self.examples_in)


@dataclass
class SelectionResult:
    selection: Selection
    plan: SelectionPlan
    timings: list[StageTiming] = field(default_factory=list)

    @property
    def seconds(self) -> float:
        return sum(t.seconds for t in self.timings)


def plan_selection(pool: Pool, strategy: str, budget: str | float | int | None = None,
                   options: dict[str, Any] | None = None) -> SelectionPlan:
    """Every check that needs no model: strategy names, options, budget, fields each strategy needs."""
    names = [name.strip() for name in str(strategy).split(PIPELINE_SEPARATOR)]
    if not all(names):
        raise ConfigError(f"strategy={strategy!r} has an empty stage; join strategy names with '+', e.g. dedup+length")
    stages = [get_strategy(name) for name in names]
    allowed: dict[str, Any] = {}
    for stage in stages:
        allowed.update(stage.options)
    options = dict(options or {})
    for key in options:
        if key not in allowed:
            close = difflib.get_close_matches(key, list(allowed), n=1, cutoff=0.5)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"option {key!r} is not an option of strategy={strategy!r}.{hint} "
                              f"Options: {', '.join(f'{k} (default {v!r})' for k, v in sorted(allowed.items())) or 'none'}")
    resolved = resolve_budget(parse_budget(budget), len(pool))
    if resolved is None and stages[-1].needs_budget:
        raise ConfigError(f"strategy={names[-1]!r} needs a budget: a fraction such as 0.3 or a count such as 300")
    merged = {**allowed, **options}
    for stage in stages:
        if stage.check is not None:
            stage.check(pool, merged)
    return SelectionPlan(str(strategy), stages, resolved, merged)


def run_selection(pool: Pool, plan: SelectionPlan, context: SelectContext) -> SelectionResult:
    context.options = plan.options
    indices = list(range(len(pool)))  # pool positions still in play
    reasons = [""] * len(pool)
    scores = None
    score_name = ""
    examples = list(pool.examples)
    details: dict[str, Any] = {}
    timings = []
    for position, stage in enumerate(plan.stages):
        last = position == len(plan.stages) - 1
        stage_budget = _stage_budget(stage, plan.budget, len(indices), last)
        subpool = Pool([examples[i] for i in indices],
                       [pool.candidates[i] for i in indices] if pool.candidates is not None else None, pool.source)
        start = time.perf_counter()
        selection = stage.select(subpool, stage_budget, context)
        timings.append(StageTiming(stage.name, len(indices), len(selection.kept), time.perf_counter() - start))
        kept_here = set(selection.kept)
        prefix = f"{stage.name}: " if len(plan.stages) > 1 else ""
        for local, global_index in enumerate(indices):
            reasons[global_index] = prefix + selection.reasons[local]
            if selection.examples is not None:
                examples[global_index] = selection.examples[local]
        if selection.scores is not None:
            scores = np.full(len(pool), np.nan)
            scores[indices] = selection.scores
            score_name = selection.score_name
        if selection.details:
            details[stage.name] = _to_global(selection.details, indices)
        indices = [indices[local] for local in sorted(kept_here)]
    final = Selection(indices, reasons, scores, score_name, examples, details)
    return SelectionResult(final, plan, timings)


def _stage_budget(stage: StrategySpec, budget: int | None, available: int, last: bool) -> int | None:
    if budget is None:
        return None
    if last:
        return min(budget, available)
    if not stage.needs_budget:
        return None  # a filter before the last stage keeps everything that passes it
    return min(available, INTERMEDIATE_FACTOR * budget)


def _to_global(details: dict, indices: list[int]) -> dict:
    """Map the pool positions inside a stage's details (dedup clusters) back to the whole pool."""
    if "clusters" in details:
        details = {**details, "clusters": [[indices[i] for i in cluster] for cluster in details["clusters"]]}
    return details
