"""What a continual method is: the choices it makes around each task's ordinary training run.

The runner (continual/runner.py) calls, for each stage (one task; joint training has one stage of
all tasks):

    examples = method.training_examples(stage)           # the task's data (+ replayed examples)
    model    = method.training_model(stage, fresh_base)  # the base the stage's adapter trains on
    train(config with training.init_adapter = method.init_adapter(stage),    # (asked after training_model)
          prepare_adapter=method.prepare_adapter(stage, .),   # e.g. InfLoRA's fixed, designed A
          extra_hooks=method.training_hooks(stage, .))         # e.g. EWC's penalty, MIGU's mask
    method.after_task(stage, model, tokenizer)           # e.g. EWC's Fisher, O-LoRA's stored A
    with method.evaluation_model(stage, model, tokenizer) as evaluated: ...   # R's row

Everything a method carries from task to task is in ``state_dict()``, saved after each stage, so a
stream resumed after a crash restarts its current task with the same state.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, ConfigDict
from torch import nn

from tuneforge.adapters.hooks import TrainingHooks
from tuneforge.config.schema import TrainConfig
from tuneforge.continual.tasks import Task
from tuneforge.data import Example

ADAPTER_NAME = "default"  # the name train.train gives the adapter it trains


class NoOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")


@dataclass(frozen=True)
class Stage:
    """One training run of the stream: ``tasks`` are indices into the stream's tasks."""

    index: int
    tasks: tuple[int, ...]
    run_dir: Path

    @property
    def adapter_dir(self) -> Path:
        return self.run_dir / "adapter"


@dataclass
class StreamContext:
    run_dir: Path
    tasks: list[Task]
    train_config: TrainConfig
    seed: int
    fresh_base: Callable[[], nn.Module] = lambda: None  # set by the runner: a new copy of the untouched base
    tokenizer: object = None  # set by the runner once the model has loaded


class ContinualMethod:
    """Sequential finetuning: one adapter, carried from task to task (the baseline every method beats)."""

    name = "sequential"
    options_class: type[BaseModel] = NoOptions

    def __init__(self, options: BaseModel, context: StreamContext):
        self.options = options
        self.context = context
        self.finished: list[Stage] = []  # stages whose training is complete, in order

    # -- the stages of the stream -------------------------------------------------------------
    def stage_tasks(self) -> list[tuple[int, ...]]:
        return [(index,) for index in range(len(self.context.tasks))]

    def training_examples(self, stage: Stage) -> list[Example]:
        return [example for index in stage.tasks for example in self.context.tasks[index].train]

    def training_model(self, stage: Stage, base: nn.Module) -> nn.Module:
        return base

    def init_adapter(self, stage: Stage) -> Path | None:
        """The adapter the stage starts from: sequential methods continue the previous task's."""
        return self.finished[-1].adapter_dir if self.finished else None

    def prepare_adapter(self, stage: Stage, model: nn.Module) -> None:
        pass

    def training_hooks(self, stage: Stage, model: nn.Module) -> list[TrainingHooks]:
        return []

    def after_task(self, stage: Stage, model: nn.Module, tokenizer) -> None:
        pass

    @contextlib.contextmanager
    def evaluation_model(self, stage: Stage, model: nn.Module, tokenizer) -> Iterator[nn.Module]:
        """The model scored after ``stage``: by default the trained model itself."""
        yield model

    def stage_finished(self, stage: Stage) -> None:
        self.finished.append(stage)

    # -- what carries over (checkpointed after each stage) --------------------------------------
    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def copy_of(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model)
