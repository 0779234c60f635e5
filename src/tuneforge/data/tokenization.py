"""Examples to token ids and labels: labels are -100 except on the tokens the model should learn.

For conversations (`train_on="assistant"`) the trained tokens are every assistant reply and the
special token that closes it (templates.py guarantees there is one, adding EOS where the template
has none): a model trained without its stop token never learns to end its answer.

Labels are aligned with `input_ids` (not shifted): like transformers' causal-LM heads, the loss
compares the prediction at position t with the label at t + 1, so label 0 is never used.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from tuneforge.data.records import Example, Message, Origin
from tuneforge.data.templates import check_template_name, render_conversation, render_prompt, resolve_template, template_writes_bos
from tuneforge.errors import ConfigError

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100  # the ignore_index of torch.nn.functional.cross_entropy and transformers' losses
TRAIN_ON = ("assistant", "all")
# "right" cuts tokens off the end (keeps the start: system prompt and question); "left" keeps the end.
TRUNCATION_SIDES = ("right", "left")


@dataclass(frozen=True)
class TokenizedExample:
    input_ids: list[int]
    labels: list[int]
    origin: Origin | None = None

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def num_trained(self) -> int:
        """Tokens that contribute to the loss; position 0 is never predicted, so it never counts."""
        return sum(1 for label in self.labels[1:] if label != IGNORE_INDEX)


def tokenize_examples(
    examples: Iterable[Example],
    tokenizer,
    template: str = "auto",
    max_seq_len: int = 1024,
    train_on: str = "assistant",
    truncation_side: str = "right",
) -> list[TokenizedExample]:
    """Render (chat examples) and tokenize examples; see the module docstring for the labels.

    `text` examples are trained on every token, with the tokenizer's BOS (if it adds one) before
    and EOS after. Examples left with no trained token after truncation at `max_seq_len` are
    dropped, with one warning naming the first few."""
    _check_options(max_seq_len, train_on, truncation_side)
    examples = list(examples)
    eos_id = _eos_id(tokenizer)
    check_template_name(template)
    # Resolved only when needed, so text-only data never triggers the 'no chat template' warning.
    resolved = resolve_template(template, tokenizer) if any(e.is_chat for e in examples) else None
    writes_bos = resolved is not None and template_writes_bos(resolved)
    bos_ids = _leading_special_ids(tokenizer)

    tokenized, dropped = [], []
    for example in examples:
        if example.is_chat:
            ids, labels = _tokenize_chat(example, tokenizer, resolved, train_on)
            if not writes_bos:
                ids, labels = bos_ids + ids, [IGNORE_INDEX] * len(bos_ids) + labels
        else:
            ids = bos_ids + _encode(tokenizer, example.text)["input_ids"] + [eos_id]
            labels = list(ids)
        ids, labels = _truncate(ids, labels, max_seq_len, truncation_side)
        item = TokenizedExample(ids, labels, example.origin)
        if item.num_trained == 0:
            dropped.append(str(example.origin))
            continue
        tokenized.append(item)
    if dropped:
        logger.warning(
            "Dropped %d example(s) with no trained tokens left after truncation to max_seq_len=%d "
            "(raise it, or use truncation_side='left'); first: %s",
            len(dropped), max_seq_len, "; ".join(dropped[:5]),
        )
    return tokenized


def encode_prompt(messages: Sequence[Message], tokenizer, template: str = "auto") -> list[int]:
    """Token ids to generate the next assistant reply from: exactly the ids training puts before
    that reply (same rendering, same BOS handling), so evaluation sees the training format."""
    resolved = resolve_template(template, tokenizer)
    ids = list(_encode(tokenizer, render_prompt(messages, tokenizer, resolved))["input_ids"])
    return ids if template_writes_bos(resolved) else _leading_special_ids(tokenizer) + ids


def _check_options(max_seq_len: int, train_on: str, truncation_side: str) -> None:
    if not isinstance(max_seq_len, int) or max_seq_len < 2:
        raise ConfigError(f"max_seq_len={max_seq_len!r} must be an integer >= 2")
    if train_on not in TRAIN_ON:
        raise ConfigError(f"train_on={train_on!r} is not one of {list(TRAIN_ON)}")
    if truncation_side not in TRUNCATION_SIDES:
        raise ConfigError(f"truncation_side={truncation_side!r} is not one of {list(TRUNCATION_SIDES)} ('right' keeps the start)")


def _eos_id(tokenizer) -> int:
    eos_id = getattr(tokenizer, "eos_token_id", None)
    if eos_id is None:
        raise ConfigError("The tokenizer has no eos_token_id, so a finetuned model could not learn to stop. Set tokenizer.eos_token before tokenizing.")
    return eos_id


def _encode(tokenizer, text: str, offsets: bool = False) -> dict:
    try:
        return tokenizer(text, add_special_tokens=False, return_offsets_mapping=offsets)
    except NotImplementedError:
        raise ConfigError(f"{type(tokenizer).__name__} cannot return character offsets, which label masking needs; load a fast tokenizer (use_fast=True).") from None


def _leading_special_ids(tokenizer) -> list[int]:
    """The ids the tokenizer puts before text when asked for special tokens (usually [BOS] or [])."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    for start in range(len(with_special) - len(plain) + 1):
        if with_special[start : start + len(plain)] == plain:
            return list(with_special[:start])
    return []


def _tokenize_chat(example: Example, tokenizer, template: str, train_on: str) -> tuple[list[int], list[int]]:
    rendered = render_conversation(example.messages, tokenizer, template, example.origin)
    encoding = _encode(tokenizer, rendered.text, offsets=True)
    ids = list(encoding["input_ids"])
    if train_on == "all":
        return ids, list(ids)
    span_of_token = _span_of_each_token(encoding["offset_mapping"], rendered.trained_spans)
    return ids, [token if span >= 0 else IGNORE_INDEX for token, span in zip(ids, span_of_token)]


def _span_of_each_token(offsets: Sequence[tuple[int, int]], spans: Sequence[tuple[int, int]]) -> list[int]:
    """For each token, the index of the trained span its characters overlap, or -1.

    A token that straddles a span's start (e.g. a SentencePiece "▁Hello" whose space belongs to
    the prompt) counts as inside: it is the token the model must produce."""
    result = []
    span = 0
    for start, end in offsets:
        while span < len(spans) and spans[span][1] <= start:
            span += 1
        # max(end, start + 1): zero-width tokens count as the character they stand at.
        inside = span < len(spans) and start < spans[span][1] and max(end, start + 1) > spans[span][0]
        result.append(span if inside else -1)
    return result


def _truncate(ids: list[int], labels: list[int], max_seq_len: int, side: str) -> tuple[list[int], list[int]]:
    if len(ids) <= max_seq_len:
        return ids, labels
    if side == "right":
        return ids[:max_seq_len], labels[:max_seq_len]
    return ids[-max_seq_len:], labels[-max_seq_len:]
