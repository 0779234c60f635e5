"""Packing fills rows tightly, and a packed row gives each example exactly its unpacked loss."""

from __future__ import annotations

import random

import pytest
import torch

from tuneforge.data import IGNORE_INDEX, TokenizedExample, block_causal_mask, collate_packed, collate_padded, pack_examples, padding_fraction
from tuneforge.errors import DataError

VOCAB = 128


def _random_examples(lengths, seed=0, text_like_first=True):
    """Random ids; labels on a random subset, and on every token of the first (a `text` example,
    whose label 0 is set: packing must not let the previous example predict it)."""
    rng = random.Random(seed)
    examples = []
    for number, length in enumerate(lengths):
        ids = [rng.randrange(VOCAB) for _ in range(length)]
        if number == 0 and text_like_first:
            labels = list(ids)
        else:
            labels = [token if rng.random() < 0.6 else IGNORE_INDEX for token in ids]
        examples.append(TokenizedExample(ids, labels))
    return examples


def test_best_fit_decreasing_on_a_known_case():
    lengths = [6, 4, 5, 5, 3, 7]
    rows = pack_examples(lengths, max_seq_len=10)
    assert sorted(sorted(lengths[i] for i in row) for row in rows) == [[3, 7], [4, 6], [5, 5]]
    assert padding_fraction(lengths, rows, 10) == 0.0


def test_every_example_is_placed_once_and_rows_fit():
    rng = random.Random(1)
    lengths = [rng.randint(10, 300) for _ in range(2000)]
    rows = pack_examples(lengths, max_seq_len=512)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in row) <= 512 for row in rows)
    # Never more rows than twice the lower bound, and in practice within a few percent of it.
    lower_bound = -(-sum(lengths) // 512)
    assert len(rows) <= lower_bound * 1.03
    assert padding_fraction(lengths, rows, 512) < 0.03
    assert pack_examples(lengths, max_seq_len=512) == rows  # deterministic


def test_beats_sequential_greedy_fill():
    rng = random.Random(2)
    lengths = [rng.choice([40, 300, 450]) for _ in range(300)]
    rows = pack_examples(lengths, max_seq_len=512)
    sequential_rows, room = 0, 0
    for length in lengths:
        if length > room:
            sequential_rows, room = sequential_rows + 1, 512
        room -= length
    assert len(rows) < sequential_rows


def test_too_long_example_is_an_error():
    with pytest.raises(DataError, match="longer than max_seq_len=8.*index 1, 9 tokens"):
        pack_examples([3, 9], max_seq_len=8)


def test_packed_collation_positions_labels_and_mask():
    examples = _random_examples([3, 4, 2])
    batch = collate_packed([examples[:2], examples[2:]], pad_id=0)
    assert batch["input_ids"].shape == (2, 7)
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 2, 3], [0, 1, 0, 1, 2, 3, 4]]
    first, second = examples[0], examples[1]
    # Each example's first label is dropped (nothing before it in its own sequence predicts it).
    assert batch["labels"][0].tolist() == [IGNORE_INDEX, *first.labels[1:], IGNORE_INDEX, *second.labels[1:]]
    assert batch["labels"][1, 2:].tolist() == [IGNORE_INDEX] * 5  # padding is never trained
    mask = batch["attention_mask"]
    assert mask.shape == (2, 1, 7, 7) and mask.dtype == torch.float32
    # Independent expectation: query q sees key k iff both lie in the same example and k <= q.
    segments = [[0, 0, 0, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1, 1]]  # row 2: one example, then padding
    for row in range(2):
        for q in range(7):
            for k in range(7):
                allowed = segments[row][q] == segments[row][k] and k <= q
                assert (mask[row, 0, q, k] == 0).item() == allowed, (row, q, k)
    assert (mask[mask != 0] == torch.finfo(torch.float32).min).all()


def test_block_causal_mask_never_crosses_boundaries_on_random_rows():
    rng = random.Random(3)
    examples = _random_examples([rng.randint(1, 30) for _ in range(40)], seed=3)
    rows = [[examples[i] for i in row] for row in pack_examples([len(e) for e in examples], 64)]
    batch = collate_packed(rows, mask_dtype=torch.bfloat16)
    mask = batch["attention_mask"]
    assert mask.dtype == torch.bfloat16
    position_ids = batch["position_ids"]
    for row in range(len(rows)):
        # Recover example starts from the layout, independently of the segment ids used inside.
        starts = [0]
        for example in rows[row]:
            starts.append(starts[-1] + len(example))
        for begin, end in zip(starts, starts[1:]):
            visible = mask[row, 0, begin:end] == 0  # (len, T): what this example's tokens may see
            assert not visible[:, :begin].any() and not visible[:, end:].any()
            assert visible[:, begin:end].equal(torch.ones(end - begin, end - begin, dtype=torch.bool).tril())
            assert position_ids[row, begin:end].tolist() == list(range(end - begin))


def _tiny_llama(attention: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    config._attn_implementation = attention
    return LlamaForCausalLM(config).eval()


def _summed_token_loss(model, batch) -> torch.Tensor:
    """Sum over trained tokens of the next-token cross-entropy, computed here (not by the model)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], position_ids=batch["position_ids"]).logits
    predictions = logits[:, :-1].reshape(-1, VOCAB)  # (B*(T-1), V)
    targets = batch["labels"][:, 1:].reshape(-1)  # (B*(T-1),)
    return torch.nn.functional.cross_entropy(predictions, targets, ignore_index=IGNORE_INDEX, reduction="sum")


def _unpacked_loss(model, examples) -> torch.Tensor:
    total = torch.zeros(())
    for example in examples:
        length = len(example)
        batch = {
            "input_ids": torch.tensor([example.input_ids]),
            "labels": torch.tensor([example.labels]),
            "attention_mask": torch.ones(1, length, dtype=torch.long),
            "position_ids": torch.arange(length)[None],
        }
        total += _summed_token_loss(model, batch)
    return total


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_packed_loss_equals_unpacked_loss(attention):
    model = _tiny_llama(attention)
    examples = _random_examples([7, 12, 5, 20, 9, 3, 16])
    with torch.no_grad():
        expected = _unpacked_loss(model, examples)
        # Rows of 44 and 28 tokens (+16 padding); the all-labelled example 0 sits mid-row, where a
        # leaked label 0 would be predicted from the end of example 1.
        packed = collate_packed([[examples[1], examples[0], examples[2], examples[3]], examples[4:]])
        packed_loss = _summed_token_loss(model, packed)
        # The model's own loss (mean over trained tokens) agrees too.
        trained = (packed["labels"][:, 1:] != IGNORE_INDEX).sum()
        model_loss = model(**packed).loss * trained
        padded_loss = _summed_token_loss(model, collate_padded(examples))
    torch.testing.assert_close(packed_loss, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model_loss, expected, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(padded_loss, expected, rtol=1e-5, atol=1e-5)


def test_without_the_block_mask_the_losses_differ():
    """Guards the equivalence test itself: a plain causal mask over the packed row must fail it."""
    model = _tiny_llama("sdpa")
    examples = _random_examples([7, 12, 5])
    with torch.no_grad():
        expected = _unpacked_loss(model, examples)
        packed = collate_packed([examples])
        packed["attention_mask"] = block_causal_mask(torch.zeros_like(packed["input_ids"]))  # one segment
        leaky = _summed_token_loss(model, packed)
    assert not torch.allclose(leaky, expected, rtol=1e-3)


def test_padded_collation_is_right_padded_and_masked():
    examples = _random_examples([2, 4], text_like_first=False)
    batch = collate_padded(examples, pad_id=5)
    assert batch["input_ids"][0].tolist() == [*examples[0].input_ids, 5, 5]
    assert batch["labels"][0].tolist() == [*examples[0].labels, IGNORE_INDEX, IGNORE_INDEX]
    assert batch["attention_mask"].tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3]] * 2
