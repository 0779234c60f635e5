"""From the ``data`` section of a config to a batch plan and evaluation batches."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from tuneforge.config.schema import TrainConfig
from tuneforge.data import BatchPlan, Example, load_examples, tokenize_examples
from tuneforge.data.datasets import dataset_names


@dataclass
class PreparedData:
    plan: BatchPlan
    eval_batches: list[dict[str, torch.Tensor]]
    eval_examples: list[Example]
    train_examples: int
    skipped_records: int


def load_split(config: TrainConfig, source: str, split: str) -> tuple[list[Example], int]:
    data = config.data
    options = dict(data.options) if source in dataset_names() else {}
    if split == "eval":
        options.pop("size", None)  # `size` sizes the training split; eval keeps its fixed default (trim with eval_size)
    result = load_examples(source, format=data.format, on_bad_record=data.on_bad_record, split=split, **options)
    return result.examples, result.skipped


def eval_source(config: TrainConfig) -> tuple[str, str] | None:
    """(source, split) of the held-out data: ``data.eval``, or a bundled train set's eval split."""
    if config.data.eval is not None:
        return config.data.eval, "eval"
    if config.data.train in dataset_names():
        return config.data.train, "eval"
    return None


def _edits_the_sequence(method: str) -> bool:
    """Model-level methods add virtual tokens or edit hidden states at given positions: they see a
    row as one sequence, so the rows they get keep each example whole."""
    from tuneforge.adapters import get_method

    return method != "full" and get_method(method).attach is not None  # full finetuning adds nothing


def prepare_data(config: TrainConfig, tokenizer, mask_dtype: torch.dtype = torch.float32,
                 select: Callable[[list[Example]], list[Example]] | None = None) -> PreparedData:
    """``select`` (data.select) picks the training examples to keep, before tokenization."""
    if config.training.objective != "sft":
        from tuneforge.train.objectives.data import prepare_objective_data

        return prepare_objective_data(config, tokenizer, mask_dtype)
    data = config.data
    train_examples, skipped = load_split(config, data.train, "train")
    if select is not None:
        train_examples = select(train_examples)
    tokenize = dict(template=data.template, max_seq_len=data.max_seq_len, train_on=data.train_on)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    plan = BatchPlan(tokenize_examples(train_examples, tokenizer, **tokenize), config.training.batch_size,
                     packing=data.packing, max_seq_len=data.max_seq_len, group_by_length=data.group_by_length,
                     seed=config.training.seed, pad_id=pad_id, mask_dtype=mask_dtype,
                     share_prefix=data.share_prefix and not _edits_the_sequence(config.adapter.method))
    eval_examples: list[Example] = []
    eval_batches: list[dict[str, torch.Tensor]] = []
    held_out = eval_source(config) if data.eval_size != 0 else None
    if held_out is not None:
        eval_examples, _ = load_split(config, *held_out)
        eval_examples = eval_examples[: data.eval_size] if data.eval_size else eval_examples
        # Evaluation never packs: each example's loss is then exactly its own.
        eval_plan = BatchPlan(tokenize_examples(eval_examples, tokenizer, **tokenize), config.training.eval_batch_size,
                              packing=False, seed=0, pad_id=pad_id)
        eval_batches = list(eval_plan.batches(0))
    return PreparedData(plan, eval_batches, eval_examples, len(train_examples), skipped)
