"""The strategy registry: a new selection strategy is one module plus one ``register_strategy`` call."""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from tuneforge.errors import ConfigError


@dataclass(frozen=True)
class StrategySpec:
    name: str
    # (pool, budget or None, context) -> Selection
    select: Callable[..., Any]
    description: str
    uses_model: bool = False
    # False: a filter with its own natural size (dedup, GRAPE); a budget then only caps it.
    needs_budget: bool = True
    options: dict[str, Any] = field(default_factory=dict)  # allowed options and their defaults
    # (pool, options) -> None; raises DataError / MissingPackageError before any model loads.
    check: Callable[..., None] | None = None


_STRATEGIES: dict[str, StrategySpec] = {}


def register_strategy(spec: StrategySpec) -> StrategySpec:
    if spec.name in _STRATEGIES:
        raise ValueError(f"selection strategy {spec.name!r} is registered twice")
    _STRATEGIES[spec.name] = spec
    return spec


def get_strategy(name: str) -> StrategySpec:
    _load_builtin_strategies()
    if name not in _STRATEGIES:
        close = difflib.get_close_matches(name, list(_STRATEGIES), n=1, cutoff=0.5)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"strategy={name!r} is not a selection strategy.{hint} Known: {', '.join(sorted(_STRATEGIES))} "
                          "(join several with '+' for a pipeline, e.g. dedup+length+diversity)")
    return _STRATEGIES[name]


def list_strategies() -> list[StrategySpec]:
    _load_builtin_strategies()
    return sorted(_STRATEGIES.values(), key=lambda spec: spec.name)


def _load_builtin_strategies() -> None:
    import tuneforge.select.strategies  # noqa: F401  (each module registers itself)
