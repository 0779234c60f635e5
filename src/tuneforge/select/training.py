"""`data.select` in a training config: selection runs before training and is recorded in the run.

The plan (strategy names, options, budget against the training data, the fields each strategy
needs) is made before the base model loads; the selection itself runs on the loaded base model,
before the adapter is attached. The run directory's ``selection/`` folder holds the kept examples
(selected.jsonl) and the report (which examples were kept and why, scores, timings).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tuneforge.data import Example
from tuneforge.select.context import SelectContext
from tuneforge.select.pool import Pool
from tuneforge.select.run import SelectionPlan, plan_selection, run_selection
from tuneforge.select.scoring.cache import ScoreCache, default_cache_dir
from tuneforge.select.scoring.model import ScoringModel

SELECTION_DIR = "selection"


@dataclass
class TrainingSelection:
    config: object  # TrainConfig
    plan: SelectionPlan
    record_dir: Path
    _recorded: tuple | None = None  # (result, pool) of the last apply, written by record()

    def bind(self, model, tokenizer) -> Callable[[list[Example]], list[Example]]:
        return lambda examples: self.apply(examples, model, tokenizer)

    def apply(self, examples: list[Example], model, tokenizer) -> list[Example]:
        settings = self.config.data.select
        cache_dir = Path(settings.cache_dir).expanduser() if settings.cache_dir else default_cache_dir()
        scorer = ScoringModel(model, tokenizer, self.config.model, self.config.data.template, settings.batch_size,
                              self.config.data.max_seq_len, ScoreCache(cache_dir))
        device = str(next(model.parameters()).device)
        pool = Pool(list(examples), source=self.config.data.train)
        result = run_selection(pool, self.plan, SelectContext(self.config.training.seed, load_scorer=lambda: scorer,
                                                              device=device))
        self._recorded = (result, pool)
        return result.selection.kept_examples(pool.examples)

    def record(self) -> None:
        """Write what was kept and why into the run. Called once the run directory is claimed, so an
        ``--overwrite`` never writes into the run it is about to move aside."""
        from tuneforge.select.report import write_report, write_selected

        if self._recorded is None:
            return
        result, pool = self._recorded
        write_selected(self.record_dir / "selected.jsonl", result, pool)
        write_report(self.record_dir, result, pool)


def plan_training_selection(config, run_dir: Path) -> TrainingSelection | None:
    settings = config.data.select
    if settings is None:
        return None
    from tuneforge.train.data_setup import load_split

    examples, _ = load_split(config, config.data.train, "train")
    plan = plan_selection(Pool(examples, source=config.data.train), settings.strategy, settings.budget, settings.options)
    return TrainingSelection(config, plan, Path(run_dir) / SELECTION_DIR)
