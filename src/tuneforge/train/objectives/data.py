"""The ``data`` section for non-SFT objectives: preference pairs, KTO examples or GRPO prompts."""

from __future__ import annotations

import torch

from tuneforge.config.schema import TrainConfig
from tuneforge.data.datasets import dataset_names
from tuneforge.data.preference import PreferencePair, PreferencePlan, load_preference_records, tokenize_records
from tuneforge.data.records import Example
from tuneforge.train.data_setup import PreparedData, _edits_the_sequence, eval_source

EVAL_ID_OFFSET = 1 << 40  # eval rows never share a reference-cache key with training rows


def prepare_objective_data(config: TrainConfig, tokenizer, mask_dtype: torch.dtype = torch.float32) -> PreparedData:
    if config.training.objective == "grpo":
        from tuneforge.train.objectives.grpo_objective import prepare_prompt_data

        return prepare_prompt_data(config, tokenizer)
    data = config.data
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    train_items, skipped, _ = _tokenized(config, tokenizer, data.train, "train")
    # Chosen and rejected share their prompt: held once per row unless a model-level method needs whole sequences.
    share_prompt = data.share_prefix and not _edits_the_sequence(config.adapter.method)
    # data.packing: several pairs per row (each still holding its prompt once), rows up to max_seq_len tokens.
    share = dict(share_prompt=share_prompt, mask_dtype=mask_dtype, pack_to=data.max_seq_len if data.packing else None)
    plan = PreferencePlan(train_items, config.training.batch_size, config.training.seed, pad_id, **share)
    eval_batches, eval_examples = [], []
    held_out = eval_source(config) if data.eval_size != 0 else None
    if held_out is not None:
        eval_items, _, eval_records = _tokenized(config, tokenizer, *held_out)
        eval_items = eval_items[: data.eval_size] if data.eval_size else eval_items
        eval_examples = _generation_examples(eval_records[: data.eval_size] if data.eval_size else eval_records)
        eval_plan = PreferencePlan(eval_items, config.training.eval_batch_size, 0, pad_id, shuffle=False,
                                   id_offset=EVAL_ID_OFFSET, **share)
        eval_batches = list(eval_plan.batches(0))
    return PreparedData(plan, eval_batches, eval_examples, len(train_items), skipped)


def _generation_examples(records) -> list[Example]:
    """Held-out pairs as conversations ending in the chosen answer: training.eval_generate scores the
    model's greedy reply against it (the target behaviour: the chosen answer, not the rejected one)."""
    return [Example(messages=r.prompt + r.chosen, origin=r.origin) for r in records if isinstance(r, PreferencePair)]


def _tokenized(config: TrainConfig, tokenizer, source: str, split: str):
    data = config.data
    options = dict(data.options) if source in dataset_names() else {}
    if split == "eval":
        options.pop("size", None)
    records, skipped = load_preference_records(source, config.training.objective, data.on_bad_record, split, **options)
    items, too_long = tokenize_records(records, tokenizer, data.template, data.max_seq_len, data.on_bad_record, source)
    return items, skipped + too_long, records
