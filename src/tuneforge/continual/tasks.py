"""The tasks of a stream, loaded and checked before any model loads.

A task is its training examples and its test examples (each with a gold answer, scored by exact
match). Training data reaches ``train.train`` as a jsonl file written into the stage's folder, so the
loop reads it like any user file and ``--resume`` compares it like any other data source.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from tuneforge.continual.config import ContinualConfig, TaskSpec
from tuneforge.data import Example, load_examples
from tuneforge.data.datasets import dataset_names
from tuneforge.errors import ConfigError, DataError
from tuneforge.fileio import atomic_write_text


@dataclass(frozen=True)
class Task:
    name: str
    train: list[Example]
    test: list[Example]


def load_tasks(config: ContinualConfig) -> list[Task]:
    specs = config.task_specs()
    if len(specs) < 2:
        raise ConfigError(f"The stream has {len(specs)} task; continual learning needs at least 2 tasks in order "
                          "(train one task with `tuneforge train`, or add tasks).")
    tasks = [_load_task(spec, index, config) for index, spec in enumerate(specs)]
    names = [task.name for task in tasks]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ConfigError(f"tasks: the names {repeated} appear more than once; give each task its own `name:`")
    return tasks


def _load_task(spec: TaskSpec, index: int, config: ContinualConfig) -> Task:
    where = f"tasks[{index}] ({spec.label})"
    if spec.data in dataset_names() and not Path(spec.data).exists():
        options = {"seed": config.seed, **spec.options}
        train = load_examples(spec.data, split="train", size=config.train_size, **options).examples
        eval_options = {key: value for key, value in options.items() if key != "size"}
        test = load_examples(spec.eval or spec.data, split="eval", **(eval_options if spec.eval is None else {})).examples
    else:
        if spec.eval is None:
            raise ConfigError(f"{where}: data={spec.data!r} is a file; give the task's held-out file as eval:")
        if spec.options:
            raise ConfigError(f"{where}: options apply to bundled datasets only; remove them for the file {spec.data!r}")
        train = load_examples(spec.data).examples
        test = load_examples(spec.eval).examples
    test = test[: config.eval_size]
    require_answers(test, where)
    return Task(spec.label, train, test)


def require_answers(examples: list[Example], where: str) -> None:
    """Every test example needs a gold answer (a final, non-empty assistant turn) for R to mean anything."""
    if not examples:
        raise DataError(f"{where}: the eval data has no examples")
    missing = [example for example in examples if not _has_answer(example)]
    if missing:
        shown = ", ".join(str(example.origin) for example in missing[:3])
        raise DataError(f"{where}: {len(missing)} of {len(examples)} eval examples have no gold answer (a final, "
                        f"non-empty assistant turn), e.g. {shown}; accuracy needs conversations whose last "
                        "turn is the answer.")


def _has_answer(example: Example) -> bool:
    if not example.is_chat or not any(message.role == "assistant" for message in example.messages):
        return False
    answer = example.answer if example.answer is not None else example.messages[-1].content
    return example.messages[-1].role == "assistant" and bool(answer.strip())


def write_jsonl(examples: list[Example], path: Path) -> Path:
    """Conversations as ``{"messages": [...]}`` lines, written atomically."""
    lines = [json.dumps({"messages": [{"role": m.role, "content": m.content} for m in example.messages]})
             for example in examples]
    return atomic_write_text(path, "".join(line + "\n" for line in lines))
