"""Shared-prefix packing: a row holds the examples' common opening once, and still gives every
example exactly the loss and the LoRA gradients it has alone."""

from __future__ import annotations

import random

import pytest
import torch
from test_data_packing import VOCAB, _summed_token_loss, _tiny_llama, _unpacked_loss

from tuneforge.adapters import LoraConfig, add_adapter
from tuneforge.data import IGNORE_INDEX, BatchPlan, TokenizedExample, collate_packed
from tuneforge.data.packing import shared_prefix_length

SYSTEM = [5, 9, 17, 3, 44, 8, 21]  # a fixed "system prompt" every example opens with


def _chat_examples(suffix_lengths, seed=0, prompt_tokens=3):
    """SYSTEM, then a per-example unlabelled prompt, then labelled answer tokens."""
    rng = random.Random(seed)
    examples = []
    for length in suffix_lengths:
        ids = SYSTEM + [rng.randrange(VOCAB) for _ in range(length)]
        answer_from = len(SYSTEM) + prompt_tokens
        labels = [IGNORE_INDEX] * answer_from + ids[answer_from:]
        examples.append(TokenizedExample(ids, labels))
    return examples


def _naive_prefix(examples) -> int:
    """The longest common prefix, cut so that it and the token after it carry no label."""
    p = 0
    while all(p < len(e) - 1 and e.input_ids[p] == examples[0].input_ids[p] for e in examples):
        p += 1
    labelled = min(next(t for t, label in enumerate(e.labels) if label != IGNORE_INDEX) for e in examples)
    return min(p, labelled - 1)


def test_the_prefix_is_the_common_unlabelled_opening():
    examples = _chat_examples([6, 9, 4])
    assert shared_prefix_length(examples) == _naive_prefix(examples) == len(SYSTEM)


def test_the_prefix_stops_one_token_before_the_first_label():
    examples = _chat_examples([6, 9, 4], prompt_tokens=0)  # answers start right after SYSTEM
    # The last SYSTEM token would have to predict each example's own first answer token: not shared.
    assert shared_prefix_length(examples) == len(SYSTEM) - 1 == _naive_prefix(examples)


def test_no_prefix_for_a_short_common_opening_or_text_data():
    mixed = _chat_examples([6, 9]) + [TokenizedExample([5, 9, 1, 2, 3, 4, 5, 6], [IGNORE_INDEX] * 8)]
    assert shared_prefix_length(mixed) == 0  # only 2 tokens in common: below the minimum
    text = [TokenizedExample(e.input_ids, list(e.input_ids)) for e in _chat_examples([6, 9])]
    assert shared_prefix_length(text) == 0  # every token is labelled: nothing may be shared


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_shared_prefix_rows_give_the_unpacked_loss(attention):
    model = _tiny_llama(attention)
    examples = _chat_examples([6, 11, 4, 9, 13, 5])
    prefix = shared_prefix_length(examples)
    with torch.no_grad():
        expected = _unpacked_loss(model, examples)
        packed = collate_packed([examples[:4], examples[4:]], shared_prefix=prefix)
        got = _summed_token_loss(model, packed)
    # Row 0 holds 4 examples in 7 + 9+14+7+12 = 49 tokens instead of 4*7 + 42 = 70.
    assert packed["input_ids"].shape[1] == prefix + sum(len(e) - prefix for e in examples[:4])
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_shared_prefix_rows_give_the_unpacked_lora_gradients():
    model = _tiny_llama("sdpa")
    add_adapter(model, LoraConfig(r=4, alpha=8, target_modules="all-linear"))
    with torch.no_grad():  # B starts at zero; move it so gradients reach A too
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1)
    examples = _chat_examples([6, 11, 4, 9])
    params = [p for p in model.parameters() if p.requires_grad]

    _unpacked_loss(model, examples).backward()
    expected = [p.grad.clone() for p in params]
    model.zero_grad()
    batch = collate_packed([examples], shared_prefix=shared_prefix_length(examples))
    _summed_token_loss(model, batch).backward()
    for got, want in zip((p.grad for p in params), expected):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_a_remainder_sees_the_prefix_and_its_own_tokens_only():
    examples = _chat_examples([3, 5])
    prefix = shared_prefix_length(examples)
    batch = collate_packed([examples], shared_prefix=prefix)
    visible = batch["attention_mask"][0, 0] == 0  # (T, T)
    first_end = prefix + len(examples[0]) - prefix  # the prefix, then example 0's remainder
    second = slice(first_end, first_end + len(examples[1]) - prefix)
    assert visible[second, :prefix].all()  # the shared system prompt
    assert not visible[second, prefix:first_end].any()  # never the other example
    assert batch["position_ids"][0, second].tolist() == list(range(prefix, len(examples[1])))
    assert batch["input_ids"][0, second].tolist() == examples[1].input_ids[prefix:]


def test_the_plan_fits_more_examples_per_row_and_counts_their_tokens():
    examples = _chat_examples([random.Random(i).randrange(4, 12) for i in range(40)])
    plain = BatchPlan(examples, batch_size=4, packing=True, max_seq_len=32, share_prefix=False)
    shared = BatchPlan(examples, batch_size=4, packing=True, max_seq_len=32, share_prefix=True)
    assert shared.shared_prefix == len(SYSTEM) and plain.shared_prefix == 0
    assert len(shared.rows) < len(plain.rows)
    assert sorted(i for row in shared.rows for i in row) == list(range(len(examples)))
    # unit_lengths count the examples' tokens (what a step trains on), row_lengths the slots used.
    assert sum(shared.unit_lengths) == sum(plain.unit_lengths) == sum(len(e) for e in examples)
    assert max(shared.row_lengths) <= 32
    assert shared.padding_fraction(0) < 0.5
    batch = shared.batches(0)[0]
    assert batch["input_ids"].shape[1] <= 32
