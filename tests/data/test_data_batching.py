"""Batch order is a pure function of (seed, epoch); length grouping cuts padding; batches resume."""

from __future__ import annotations

import random

import pytest
import torch

from tuneforge.data import IGNORE_INDEX, BatchPlan, TokenizedExample, build_batches
from tuneforge.errors import ConfigError


def _examples(count=103, seed=0):
    rng = random.Random(seed)
    examples = []
    for number in range(count):
        length = rng.randint(4, 60)
        # The first token carries the example number, so batches can be traced back to examples.
        ids = [number] + [rng.randrange(1000) for _ in range(length - 1)]
        examples.append(TokenizedExample(ids, [IGNORE_INDEX] + ids[1:]))
    return examples


def _example_numbers(plan: BatchPlan, epoch: int) -> list[list[int]]:
    return [[plan.examples[i].input_ids[0] for unit in units for i in plan.rows[unit]] for units in plan.batch_units(epoch)]


@pytest.mark.parametrize("options", [{}, {"packing": True, "max_seq_len": 128}, {"group_by_length": True}], ids=["shuffled", "packed", "grouped"])
def test_each_epoch_covers_every_example_once_in_a_seeded_order(options):
    examples = _examples()
    plan = BatchPlan(examples, batch_size=4, seed=7, **options)
    epoch0 = _example_numbers(plan, 0)
    assert sorted(n for batch in epoch0 for n in batch) == list(range(len(examples)))
    assert _example_numbers(BatchPlan(examples, batch_size=4, seed=7, **options), 0) == epoch0  # a fresh plan agrees
    assert _example_numbers(plan, 1) != epoch0
    assert _example_numbers(BatchPlan(examples, batch_size=4, seed=8, **options), 0) != epoch0
    assert len(plan.batches(0)) == plan.num_batches == len(plan.batch_units(3))


def test_batches_can_be_resumed_at_any_index():
    examples = _examples()
    plan = BatchPlan(examples, batch_size=2, packing=True, max_seq_len=128, seed=3)
    seen = list(plan.batches(2))
    resumed = BatchPlan(examples, batch_size=2, packing=True, max_seq_len=128, seed=3).batches(2)
    assert len(seen) > 10
    for k in (0, 5, len(seen) - 1):
        for key in ("input_ids", "labels", "position_ids", "attention_mask"):
            assert torch.equal(resumed[k][key], seen[k][key])
    assert [b["input_ids"].tolist() for b in resumed[5:]] == [b["input_ids"].tolist() for b in seen[5:]]


def test_group_by_length_reduces_padding_and_sorts_within_mega_batches():
    examples = _examples(count=400)
    shuffled = BatchPlan(examples, batch_size=8, seed=0)
    grouped = BatchPlan(examples, batch_size=8, seed=0, group_by_length=True)
    assert grouped.padding_fraction(0) < shuffled.padding_fraction(0) / 3
    # With 400 examples < 8 * 50, the single mega-batch is sorted: batch lengths never interleave.
    spans = sorted((min(lengths), max(lengths)) for lengths in ([len(examples[i]) for i in units] for units in grouped.batch_units(0)))
    assert all(previous[1] <= current[0] for previous, current in zip(spans, spans[1:]))
    # ... while the batch order itself is shuffled (not longest-to-shortest).
    maxima = [max(len(examples[i]) for i in units) for units in grouped.batch_units(0)]
    assert maxima != sorted(maxima, reverse=True) and maxima != sorted(maxima)


def test_packed_batches_have_little_padding_and_4d_masks():
    examples = _examples(count=300)
    plan = BatchPlan(examples, batch_size=4, packing=True, max_seq_len=256, mask_dtype=torch.bfloat16)
    assert plan.padding_fraction(0) < 0.05
    batch = plan.batches(0)[0]
    rows, length = batch["input_ids"].shape
    assert batch["attention_mask"].shape == (rows, 1, length, length)
    assert batch["attention_mask"].dtype == torch.bfloat16
    assert length <= 256


def test_drop_last():
    examples = _examples(count=10)
    assert BatchPlan(examples, batch_size=4).num_batches == 3
    plan = BatchPlan(examples, batch_size=4, drop_last=True)
    assert plan.num_batches == 2 and [len(units) for units in plan.batch_units(0)] == [4, 4]


def test_build_batches_yields_model_ready_dicts():
    batches = build_batches(_examples(count=9), batch_size=4, seed=1, epoch=0)
    shapes = [tuple(batch["input_ids"].shape) for batch in batches]
    assert [rows for rows, _ in shapes] == [4, 4, 1]
    for batch in batches:
        assert set(batch) == {"input_ids", "labels", "attention_mask", "position_ids"}
        assert batch["attention_mask"].shape == batch["input_ids"].shape


def test_invalid_plans_are_config_errors():
    examples = _examples(count=5)
    with pytest.raises(ConfigError, match="group_by_length=True applies to unpacked batches"):
        BatchPlan(examples, batch_size=2, packing=True, group_by_length=True)
    with pytest.raises(ConfigError, match="batch_size=0"):
        BatchPlan(examples, batch_size=0)
    with pytest.raises(ConfigError, match="leaves no batch"):
        BatchPlan(examples, batch_size=8, drop_last=True)
