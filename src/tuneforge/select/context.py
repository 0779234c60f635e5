"""What a strategy may use besides the pool: the seed, its options, and a base model loaded only on first use."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from tuneforge.select.scoring.model import ScoringModel


@dataclass
class SelectContext:
    seed: int = 0
    options: dict[str, Any] = field(default_factory=dict)
    # Builds the scoring model; called at most once, and only by strategies that need a model.
    load_scorer: Callable[[], ScoringModel] | None = None
    device: str = "cpu"
    _scorer: ScoringModel | None = None

    def scorer(self) -> ScoringModel:
        if self._scorer is None:
            if self.load_scorer is None:
                raise RuntimeError("this selection needs a model, but none was given")
            self._scorer = self.load_scorer()
        return self._scorer

    def option(self, name: str) -> Any:
        return self.options[name]
