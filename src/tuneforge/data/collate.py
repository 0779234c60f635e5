"""Tokenized examples to model inputs: padded batches and packed rows.

Both return `input_ids`, `labels`, `position_ids` (B, T) and `attention_mask`, ready for
`model(**batch)` with any transformers causal LM.

Packed rows must give every example exactly the loss it would have alone. This is how:

1. `position_ids` restart at 0 for each example, so rotary embeddings see the same positions.
2. `attention_mask` is a 4D block-diagonal causal mask (B, 1, T, T): a token attends to earlier
   tokens of its own example only. transformers 5 returns a 4D mask unchanged
   (`masking_utils._preprocess_mask_arguments`: "If the mask is already 4D, simply return
   as-is") and both attention paths then use it directly: eager *adds* it to the scores, SDPA
   takes it as `attn_mask`. It is therefore additive (0 = attend, dtype-min = blocked), the one
   form both accept; a boolean mask would be silently wrong under eager attention. Pass the
   model's compute dtype as `mask_dtype` (e.g. torch.bfloat16): eager adds the mask to scores of
   that dtype, and torch's SDPA accepts a float32 mask with bf16 queries but then converts it in
   every layer. Because the mask is used as given, a model's sliding window is not applied on
   top of it: rows must not be longer than the window.
3. The label of each example's first token is set to -100: the causal-LM loss compares the
   prediction at t with the label at t + 1, so without this the last token of one example would
   be trained to predict the first token of the next. (Alone, label 0 is never used anyway.)
4. With a shared prefix (packing.py) the row starts with the prefix once, as its own segment that
   every example's remainder may attend to; the remainders' positions continue from the prefix.
   Each example then sees exactly the tokens and positions it has alone. The prefix carries no
   labels, and the LoRA gradient through it is the sum of the examples' gradients through their
   own copies, because its activations are those of each copy.

Padding at the end of a row forms its own masked-out segment with labels -100; it attends only to
itself, so no attention row is fully blocked (which would give NaN under SDPA).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from tuneforge.data.tokenization import IGNORE_INDEX, TokenizedExample

PADDING_SEGMENT = -1
SHARED_SEGMENT = -2  # a row's shared prefix: every example of the row attends to it


def collate_padded(examples: Sequence[TokenizedExample], pad_id: int = 0) -> dict[str, torch.Tensor]:
    """One example per row, right-padded to the longest; `attention_mask` is the usual 2D 1/0 mask."""
    length = max(len(example) for example in examples)
    input_ids = torch.full((len(examples), length), pad_id, dtype=torch.long)  # (B, T)
    labels = torch.full((len(examples), length), IGNORE_INDEX, dtype=torch.long)  # (B, T)
    attention_mask = torch.zeros((len(examples), length), dtype=torch.long)  # (B, T)
    for row, example in enumerate(examples):
        input_ids[row, : len(example)] = torch.tensor(example.input_ids)
        labels[row, : len(example)] = torch.tensor(example.labels)
        attention_mask[row, : len(example)] = 1
    position_ids = torch.arange(length).expand(len(examples), length).clone()  # (B, T)
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask, "position_ids": position_ids}


def collate_packed(rows: Sequence[Sequence[TokenizedExample]], pad_id: int = 0, mask_dtype: torch.dtype = torch.float32,
                   shared_prefix: int = 0) -> dict[str, torch.Tensor]:
    """Several examples per row, right-padded to the longest row; see the module docstring.

    `shared_prefix` > 0: the examples all begin with the same `shared_prefix` unlabelled tokens
    (packing.shared_prefix_length); each row holds them once, followed by every example's remainder.
    """
    length = max(shared_prefix + sum(len(example) - shared_prefix for example in row) for row in rows)
    input_ids = torch.full((len(rows), length), pad_id, dtype=torch.long)  # (B, T)
    labels = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long)  # (B, T)
    position_ids = torch.zeros((len(rows), length), dtype=torch.long)  # (B, T)
    segment_ids = torch.full((len(rows), length), PADDING_SEGMENT, dtype=torch.long)  # (B, T)
    for row, examples in enumerate(rows):
        start = shared_prefix
        if shared_prefix:
            input_ids[row, :shared_prefix] = torch.tensor(examples[0].input_ids[:shared_prefix])
            position_ids[row, :shared_prefix] = torch.arange(shared_prefix)
            segment_ids[row, :shared_prefix] = SHARED_SEGMENT
        for segment, example in enumerate(examples):
            end = start + len(example) - shared_prefix
            input_ids[row, start:end] = torch.tensor(example.input_ids[shared_prefix:])
            # The first token is never a target here: alone it has no predecessor, and after a shared
            # prefix its label is unset by construction (packing.shared_prefix_length).
            labels[row, start + 1 : end] = torch.tensor(example.labels[shared_prefix + 1:])
            position_ids[row, start:end] = torch.arange(shared_prefix, len(example))
            segment_ids[row, start:end] = segment
            start = end
        position_ids[row, start:] = torch.arange(length - start)
    attention_mask = block_causal_mask(segment_ids, mask_dtype)
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask, "position_ids": position_ids}


def block_causal_mask(segment_ids: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Additive mask (B, 1, T, T): 0 where query t may attend key s (s <= t, and the same segment or
    a shared-prefix key seen from an example), else the most negative value of `dtype` (not -inf,
    which turns into NaN once multiplied by 0)."""
    length = segment_ids.shape[1]
    same_segment = segment_ids[:, :, None] == segment_ids[:, None, :]  # (B, T, T)
    shared_key = (segment_ids[:, None, :] == SHARED_SEGMENT) & (segment_ids[:, :, None] >= 0)  # (B, T, T)
    causal = torch.ones((length, length), dtype=torch.bool).tril()  # (T, T)
    allowed = ((same_segment | shared_key) & causal)[:, None]  # (B, 1, T, T)
    attend = torch.zeros((), dtype=dtype)
    blocked = torch.tensor(torch.finfo(dtype).min, dtype=dtype)
    return torch.where(allowed, attend, blocked)  # (B, 1, T, T)
