"""The ``tuneforge continual`` config: a task stream, a method, and the train config every task uses.

    output_dir: runs/continual
    stream: synthetic4                 # a bundled stream, or `tasks:` (a list, below)
    train_size: 200                    # training examples per bundled task
    eval_size: 50                      # test examples per task, scored by exact match for R
    method: {name: replay, fraction: 0.1}
    probe: {data: auto, size: 32}      # "general ability": loss on a fixed probe set
    train:                             # an ordinary train config; training.max_steps = each task's budget
      model: smollm2-135m
      adapter: {method: lora, r: 8}
      training: {max_steps: 60, batch_size: 8, lr: 1e-3}

``tasks:`` entries are ``{data: <bundled name or file>, eval: <file, for a file>, name:, options:}``.
Defaults live here; the ``train:`` section's defaults are config/schema.py's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from tuneforge.config.schema import TrainConfig, parse_train_config
from tuneforge.continual.streams import stream_tasks
from tuneforge.errors import ConfigError


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TaskSpec(Section):
    data: str = Field(..., description="a bundled dataset name, or a data file / folder with conversations")
    eval: str | None = Field(None, description="held-out file of the task (needed when data is a file)")
    name: str | None = Field(None, description="the task's name in reports (default: the data's name)")
    options: dict[str, Any] = Field(default_factory=dict, description="bundled dataset options, e.g. {seed: 1}")

    @property
    def label(self) -> str:
        return self.name or Path(self.data).stem


class ProbeSpec(Section):
    data: str = Field("auto", description="probe data for general-ability drift: auto (chatterbot when "
                      "chatterbot-corpus is installed, else the bundled probe), bundled, or a data file")
    size: int = Field(32, ge=1, description="probe examples")


class ContinualConfig(Section):
    output_dir: str = Field("runs/continual", description="the stream's run directory")
    stream: str | None = Field(None, description="a bundled stream (synthetic4, mixed4); or give tasks")
    tasks: list[TaskSpec] = Field(default_factory=list, description="the tasks in training order")
    train_size: int = Field(200, ge=1, description="training examples per bundled task")
    eval_size: int = Field(50, ge=1, description="test examples per task scored for R")
    max_new_tokens: int = Field(24, ge=1, description="tokens generated per test answer")
    method: dict[str, Any] = Field(default_factory=lambda: {"name": "sequential"},
                                   description="the continual method and its options, e.g. {name: ewc, strength: 100}")
    probe: ProbeSpec = Field(default_factory=ProbeSpec)
    seed: int = Field(0, description="seed of method choices (replay sampling)")
    train: dict[str, Any] = Field(default_factory=dict, description="the train config every task uses")

    @model_validator(mode="after")
    def _stream_or_tasks(self) -> "ContinualConfig":
        if self.stream is not None and self.tasks:
            raise ValueError("give either stream (a bundled stream) or tasks (your own list), not both")
        if self.stream is None and not self.tasks:
            raise ValueError("no tasks: set stream (synthetic4 or mixed4) or list tasks")
        return self

    def task_specs(self) -> list[TaskSpec]:
        if self.stream is not None:
            return [TaskSpec(data=name) for name in stream_tasks(self.stream)]
        return list(self.tasks)


def parse_continual_config(data: dict[str, Any], source: str = "config") -> tuple[ContinualConfig, TrainConfig]:
    """The validated continual config and its per-task train config; every problem in one ConfigError."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: a continual config must be a mapping, found {type(data).__name__}")
    try:
        config = ContinualConfig(**data)
    except ValidationError as exc:
        problems = [f"  {'.'.join(str(p) for p in err['loc']) or '(top level)'}: {err['msg'].removeprefix('Value error, ')}"
                    for err in exc.errors()]
        raise ConfigError(f"{source} has {len(problems)} problem(s):\n" + "\n".join(problems)) from None
    train_config = parse_train_config(config.train, f"{source} (train section)")
    if train_config.training.objective != "sft":
        raise ConfigError(f"{source}: train.training.objective={train_config.training.objective!r}; continual "
                          "streams train with objective sft")
    if train_config.training.init_adapter is not None:
        raise ConfigError(f"{source}: train.training.init_adapter is set by the continual method; remove it")
    return config, train_config
