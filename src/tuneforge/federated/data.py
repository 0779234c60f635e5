"""Each client's share of the data, written as ordinary tuneforge data files.

A client pools ``federated.sources`` (default ``data.train``), splits the pool as the config says
and writes its own part to ``train.jsonl`` / ``eval.jsonl`` in the messages format; its train config
then points there, so training reads the part through the same data path as any run.
"""

from __future__ import annotations

import json

import numpy as np
from pathlib import Path

from tuneforge.config.schema import TrainConfig
from tuneforge.data.records import Example
from tuneforge.federated.config import FederatedSettings
from tuneforge.federated.partition import dirichlet_partition, iid_partition
from tuneforge.fileio import atomic_write_text
from tuneforge.data.datasets import dataset_names
from tuneforge.train.data_setup import load_split


def pooled_examples(config: TrainConfig, settings: FederatedSettings, split: str) -> tuple[list[Example], list[str]]:
    """All examples of the pooled sources for ``split``, each with its label for a Dirichlet split."""
    examples: list[Example] = []
    labels: list[str] = []
    for source in settings.sources or [config.data.train]:
        origin = _split_source(config, settings, source, split)
        if origin is None:
            continue
        source_examples, _ = load_split(config, origin, split)
        examples.extend(source_examples)
        labels.extend(_label(example, source, settings.label_by) for example in source_examples)
    return examples, labels


def _split_source(config: TrainConfig, settings: FederatedSettings, source: str, split: str) -> str | None:
    """Where ``source``'s ``split`` comes from: itself (a bundled set has both splits), or ``data.eval``."""
    if split == "train" or source in dataset_names():
        return source
    return config.data.eval if not settings.sources else None


def _label(example: Example, source: str, label_by: str) -> str:
    if label_by == "task":
        return source
    return example.answer if example.answer is not None else ""


def client_parts(labels: list[str], settings: FederatedSettings, seed_offset: int = 0) -> list[list[int]]:
    seed = settings.seed + seed_offset
    if settings.partition == "iid":
        return iid_partition(len(labels), settings.clients, seed)
    return dirichlet_partition(labels, settings.clients, settings.alpha, seed)


def _shuffled(indices: list[int], seed: int) -> list[int]:
    return [indices[i] for i in np.random.default_rng(seed).permutation(len(indices))]


def write_examples(examples: list[Example], path: Path) -> None:
    """The examples as a jsonl file tuneforge reads back unchanged (messages or text format)."""
    lines = []
    for example in examples:
        if example.is_chat:
            record = {"messages": [{"role": m.role, "content": m.content} for m in example.messages]}
        else:
            record = {"text": example.text}
        lines.append(json.dumps(record, ensure_ascii=False))
    atomic_write_text(path, "\n".join(lines) + "\n")


def client_train_config(config: TrainConfig, settings: FederatedSettings, partition_id: int,
                        workdir: Path) -> TrainConfig:
    """``config`` pointed at client ``partition_id``'s own train (and eval) files in ``workdir``."""
    workdir.mkdir(parents=True, exist_ok=True)
    train_examples, train_labels = pooled_examples(config, settings, "train")
    own = _shuffled(client_parts(train_labels, settings)[partition_id], settings.seed)
    write_examples([train_examples[i] for i in own], workdir / "train.jsonl")
    eval_path = None
    if config.data.eval_size != 0:
        eval_examples, eval_labels = pooled_examples(config, settings, "eval")
        if len(eval_examples) >= settings.clients:
            # shuffled, so that trimming to data.eval_size keeps a mix of the client's tasks
            own_eval = _shuffled(client_parts(eval_labels, settings, seed_offset=1)[partition_id], settings.seed)
            eval_path = workdir / "eval.jsonl"
            write_examples([eval_examples[i] for i in own_eval], eval_path)
    data = config.data.model_copy(update={"train": str(workdir / "train.jsonl"), "format": "messages"
                                          if train_examples and train_examples[0].is_chat else "text",
                                          "eval": str(eval_path) if eval_path else None,
                                          "eval_size": config.data.eval_size if eval_path else 0,
                                          "options": {}})
    return config.model_copy(update={"data": data, "output_dir": str(workdir / "run")})


def local_data_config(config: TrainConfig, train_path: str, eval_path: str | None, workdir: Path) -> TrainConfig:
    """``config`` pointed at data that exists only on this client's machine, used whole (no split)."""
    data = config.data.model_copy(update={"train": train_path, "eval": eval_path, "options": {},
                                          "eval_size": config.data.eval_size if eval_path else 0})
    return config.model_copy(update={"data": data, "output_dir": str(workdir / "run")})


def global_eval_config(config: TrainConfig, settings: FederatedSettings,
                       workdir: Path) -> tuple[TrainConfig | None, list[Example]]:
    """``config`` pointed at the union of every client's eval data (the server's global evaluation),
    and those examples, shuffled."""
    if config.data.eval_size == 0:
        return None, []
    eval_examples, _ = pooled_examples(config, settings, "eval")
    if not eval_examples:
        return None, []
    workdir.mkdir(parents=True, exist_ok=True)
    eval_examples = [eval_examples[i] for i in _shuffled(list(range(len(eval_examples))), settings.seed)]
    write_examples(eval_examples, workdir / "global_eval.jsonl")
    write_examples(eval_examples[:1], workdir / "unused_train.jsonl")
    data = config.data.model_copy(update={"train": str(workdir / "unused_train.jsonl"),
                                          "eval": str(workdir / "global_eval.jsonl"),
                                          "format": "messages" if eval_examples[0].is_chat else "text",
                                          "eval_size": (config.data.eval_size or 0) * settings.clients or None,
                                          "options": {}})
    return config.model_copy(update={"data": data}), eval_examples
