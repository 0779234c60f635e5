"""Data for preference and reward objectives: pairs, KTO examples and GRPO prompts.

| record                                   | objective              | notes                                      |
|------------------------------------------|------------------------|--------------------------------------------|
| {prompt, chosen, rejected}               | dpo, ipo, orpo, simpo  | each a string or a [{role, content}] list   |
| {chosen, rejected} (prompt inside both)  | dpo, ipo, orpo, simpo  | the shared opening is taken as the prompt   |
| {prompt, completion, label}              | kto                    | label: true (desirable) or false            |

A bundled task (e.g. ``arithmetic``) gives deterministic pairs: chosen is the right answer,
rejected a wrong one or the right one said verbosely; for KTO, alternate examples get the right (desirable) or a wrong answer.
Bad records are reported like SFT data: file and line, the key, and what to do.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tuneforge.data.batching import EpochBatches
from tuneforge.data.collate import PADDING_SEGMENT, collate_padded
from tuneforge.data.packing import pack_examples
from tuneforge.data.datasets import dataset_names, get_dataset
from tuneforge.data.formats import RecordError, _preview
from tuneforge.data.loading import _apply_bad_record_policy
from tuneforge.data.records import ROLES, Example, Message, Origin
from tuneforge.data.sources import data_files, read_records
from tuneforge.data.tokenization import IGNORE_INDEX, TokenizedExample, tokenize_examples
from tuneforge.errors import DataError


@dataclass(frozen=True)
class PreferencePair:
    prompt: tuple[Message, ...]
    chosen: tuple[Message, ...]  # the answer turn(s) only
    rejected: tuple[Message, ...]
    origin: Origin | None = None


@dataclass(frozen=True)
class KtoExample:
    prompt: tuple[Message, ...]
    completion: tuple[Message, ...]
    desirable: bool
    origin: Origin | None = None


# ---------------------------------------------------------------- records -> pairs / KTO examples

def _turns(record: dict[str, Any], key: str, default_role: str) -> tuple[Message, ...]:
    """A string (one ``default_role`` turn) or a [{role, content}] list."""
    if key not in record or record[key] is None:
        raise RecordError(f"missing the field {key!r} (the record has keys {sorted(record)})")
    value = record[key]
    if isinstance(value, str):
        return (Message(default_role, value),)
    if not isinstance(value, list):
        raise RecordError(f"field {key!r} must be a string or a list of {{role, content}} messages, got "
                          f"{type(value).__name__} ({_preview(value)})")
    messages = []
    for index, message in enumerate(value):
        if not isinstance(message, dict) or message.get("role") not in ROLES or not isinstance(message.get("content"), str):
            raise RecordError(f"{key}[{index}] must be {{role, content}} with role one of {list(ROLES)} and string "
                              f"content, got {_preview(message)}")
        messages.append(Message(message["role"], message["content"]))
    return tuple(messages)


def _check_answer(turns: tuple[Message, ...], key: str) -> None:
    if not turns or turns[-1].role != "assistant":
        raise RecordError(f"{key!r} must end with an assistant turn (the answer being judged)")
    if not any(m.content.strip() for m in turns if m.role == "assistant"):
        raise RecordError(f"{key!r} is an empty completion; remove the record or give it an answer")


def split_implicit_prompt(chosen: tuple[Message, ...], rejected: tuple[Message, ...]) -> tuple[tuple[Message, ...], ...]:
    """(prompt, chosen answer, rejected answer) when the prompt is the turns both conversations open with."""
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    while shared and chosen[shared - 1].role == "assistant":  # the answer starts at the first differing assistant turn
        shared -= 1
    if shared == 0 and len(chosen) == 1 and len(rejected) == 1:
        return _split_shared_text(chosen[0].content, rejected[0].content)
    return chosen[:shared], chosen[shared:], rejected[shared:]


def _split_shared_text(chosen: str, rejected: str) -> tuple[tuple[Message, ...], ...]:
    """Plain strings: the longest common opening, cut back to a whitespace boundary, is the prompt."""
    end = 0
    while end < min(len(chosen), len(rejected)) and chosen[end] == rejected[end]:
        end += 1
    cut = max(chosen.rfind(" ", 0, end + 1), chosen.rfind("\n", 0, end + 1)) + 1 if end < len(chosen) else end
    prompt = chosen[:cut].rstrip()
    if not prompt:
        raise RecordError("no 'prompt' key, and 'chosen' and 'rejected' share no opening text to take as the prompt; "
                          "add a 'prompt' field")
    return (Message("user", prompt),), (Message("assistant", chosen[cut:]),), (Message("assistant", rejected[cut:]),)


def convert_pair(record: Any, origin: Origin) -> PreferencePair:
    if not isinstance(record, dict):
        raise RecordError(f"expected a JSON object with prompt, chosen, rejected; got {type(record).__name__} ({_preview(record)})")
    chosen, rejected = _turns(record, "chosen", "assistant"), _turns(record, "rejected", "assistant")
    if chosen == rejected:
        raise RecordError("'chosen' and 'rejected' are identical, so there is no preference to learn; remove the record")
    if "prompt" in record and record["prompt"] is not None:
        prompt = _turns(record, "prompt", "user")
    else:
        prompt, chosen, rejected = split_implicit_prompt(chosen, rejected)
    _check_answer(chosen, "chosen")
    _check_answer(rejected, "rejected")
    if chosen == rejected:
        raise RecordError("'chosen' and 'rejected' are identical, so there is no preference to learn; remove the record")
    return PreferencePair(prompt, chosen, rejected, origin)


def convert_kto(record: Any, origin: Origin) -> KtoExample:
    if not isinstance(record, dict):
        raise RecordError(f"expected a JSON object with prompt, completion, label; got {type(record).__name__} ({_preview(record)})")
    prompt, completion = _turns(record, "prompt", "user"), _turns(record, "completion", "assistant")
    _check_answer(completion, "completion")
    label = record.get("label")
    if not isinstance(label, bool):
        raise RecordError(f"field 'label' must be true (desirable) or false (undesirable), got {_preview(label)}")
    return KtoExample(prompt, completion, label, origin)


# ---------------------------------------------------------------- bundled tasks -> deterministic records

def wrong_answer(answer: str, rng: random.Random) -> str:
    """A plausible wrong answer: a nearby number for numeric answers, else the answer reversed/suffixed."""
    if answer.strip().lstrip("-").isdigit():
        value = int(answer)
        return str(value + rng.choice([d for d in (-3, -2, -1, 1, 2, 3) if value + d >= 0]))
    return answer[::-1] if answer[::-1] != answer else answer + " not"


VERBOSE_ANSWERS = ("The answer is {answer}.",
                   "Let me work it out step by step. After every change, the total comes to {answer}.",
                   "Sure! Counting everything up, I get {answer} in the end.")


def verbose_answer(answer: str, rng: random.Random) -> str:
    """The right answer, wrapped in a sentence the task's "answer with just the number" rules out."""
    return rng.choice(VERBOSE_ANSWERS).format(answer=answer)


def pairs_from_task(examples: Sequence[Example], seed: int) -> list[PreferencePair]:
    """Chosen: the bare right answer. Rejected: a nearby wrong answer (even-numbered examples) or the
    right one said verbosely (odd-numbered), so DPO teaches both correctness and the concise format."""
    rng = random.Random(seed)
    return [PreferencePair(e.prompt_messages, (Message("assistant", e.answer),),
                           (Message("assistant", wrong_answer(e.answer, rng) if i % 2 == 0 else verbose_answer(e.answer, rng)),),
                           e.origin) for i, e in enumerate(examples)]


def kto_from_task(examples: Sequence[Example], seed: int) -> list[KtoExample]:
    rng = random.Random(seed)
    return [KtoExample(e.prompt_messages, (Message("assistant", e.answer if i % 2 == 0 else wrong_answer(e.answer, rng)),),
                       i % 2 == 0, e.origin) for i, e in enumerate(examples)]


# ---------------------------------------------------------------- loading

def load_preference_records(source: str, objective: str, on_bad_record: str = "error", split: str = "train",
                            **dataset_options) -> tuple[list, int]:
    """(pairs or KTO examples, skipped count) from a file, folder or bundled task."""
    if not Path(source).exists() and source in dataset_names():
        examples = get_dataset(source, split=split, **dataset_options)
        _require_answers(examples, source)
        seed = 0 if split == "train" else 1
        return (kto_from_task(examples, seed) if objective == "kto" else pairs_from_task(examples, seed)), 0
    if not Path(source).exists():
        raise DataError(f"Data source {source!r} is neither an existing file or folder nor a bundled dataset "
                        f"({', '.join(dataset_names())}).")
    convert = convert_kto if objective == "kto" else convert_pair
    records, problems = [], []
    for file in data_files(Path(source)):
        for raw in read_records(file):
            if raw.problem is not None:
                problems.append(f"{raw.origin}: {raw.problem}")
                continue
            try:
                records.append(convert(raw.value, raw.origin))
            except RecordError as error:
                problems.append(f"{raw.origin}: {error}")
    if problems:
        _apply_bad_record_policy(problems, on_bad_record, source)
    if not records:
        raise DataError(f"Data source {source!r} has no usable {'KTO examples' if objective == 'kto' else 'preference pairs'}"
                        f" (each record needs {_needs(objective)}).")
    return records, len(problems)


def _needs(objective: str) -> str:
    return "prompt, completion, label" if objective == "kto" else "prompt, chosen, rejected"


def _require_answers(examples: Sequence[Example], source: str) -> None:
    if any(e.answer is None for e in examples):
        raise DataError(f"the bundled dataset {source!r} has no checkable answers to build preference data from")


# ---------------------------------------------------------------- tokens and batches

@dataclass(frozen=True)
class TokenizedPair:
    chosen: TokenizedExample
    rejected: TokenizedExample

    def __len__(self) -> int:
        return len(self.chosen) + len(self.rejected)


def tokenize_records(records: Sequence, tokenizer, template: str, max_seq_len: int, on_bad_record: str,
                     source: str) -> tuple[list, int]:
    """Tokenize pairs (two sequences each) or KTO examples (one). A prompt that leaves no room for the
    answer within max_seq_len is a bad record, reported or skipped like any other."""
    items, problems = [], []
    for record in records:
        if isinstance(record, PreferencePair):
            sides = [record.prompt + record.chosen, record.prompt + record.rejected]
        else:
            sides = [record.prompt + record.completion]
        tokenized = [tokenize_examples([Example(messages=turns, origin=record.origin)], tokenizer, template=template,
                                       max_seq_len=max_seq_len) for turns in sides]
        if any(not t for t in tokenized):
            problems.append(f"{record.origin}: the prompt is {max_seq_len} tokens or longer, so no answer token fits; "
                            "raise data.max_seq_len or shorten the prompt")
            continue
        if len(sides) == 2 and (tokenized[0][0].input_ids, tokenized[0][0].labels) == (tokenized[1][0].input_ids, tokenized[1][0].labels):
            problems.append(f"{record.origin}: 'chosen' and 'rejected' are the same {len(tokenized[0][0])} tokens once cut "
                            f"to data.max_seq_len={max_seq_len} (they differ only beyond it), so there is no preference "
                            "left to learn; raise data.max_seq_len or shorten the prompt")
            continue
        items.append(TokenizedPair(tokenized[0][0], tokenized[1][0]) if len(sides) == 2
                     else (tokenized[0][0], record.desirable))
    if problems:
        _apply_bad_record_policy(problems, on_bad_record, source)
    if not items:
        raise DataError(f"{source}: no record fits data.max_seq_len={max_seq_len}")
    return items, len(problems)


class PreferencePlan:
    """Shuffled batches of pairs (or KTO examples), with the interface of BatchPlan the loop uses.

    A pair batch holds rows [chosen_1..chosen_P, rejected_1..rejected_P]; ``example_ids`` names each
    row (2i for chosen, 2i + 1 for rejected, offset by ``id_offset``) for the reference cache."""

    def __init__(self, items: Sequence, batch_size: int, seed: int, pad_id: int, shuffle: bool = True, id_offset: int = 0,
                 share_prompt: bool = False, mask_dtype: torch.dtype = torch.float32, pack_to: int | None = None):
        self.share_prompt = share_prompt
        self.pack_to = pack_to if share_prompt else None  # several pairs per row, rows of at most this many tokens
        self.mask_dtype = mask_dtype
        self.items = list(items)
        self.batch_size = batch_size
        self.seed = seed
        self.pad_id = pad_id
        self.shuffle = shuffle
        self.id_offset = id_offset
        self.unit_lengths = [len(item) if isinstance(item, TokenizedPair) else len(item[0]) for item in self.items]

    @property
    def num_batches(self) -> int:
        return -(-len(self.items) // self.batch_size)

    def batches(self, epoch: int) -> EpochBatches:
        order = list(range(len(self.items)))
        if self.shuffle:
            random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        return EpochBatches(self, [order[i:i + self.batch_size] for i in range(0, len(order), self.batch_size)])

    def collate(self, units: list[int]) -> dict[str, torch.Tensor]:
        chosen = [self.items[u] for u in units]
        if isinstance(chosen[0], TokenizedPair) and self.pack_to:
            rows = pack_pairs(chosen, self.pack_to)
            units = [units[i] for row in rows for i in row]  # label_segments number the pairs row by row
            batch = collate_pair_rows([[self.items[u] for u in row] for row in _split_like(units, rows)],
                                      self.pad_id, self.mask_dtype)
            ids = [2 * u for u in units] + [2 * u + 1 for u in units]
        elif isinstance(chosen[0], TokenizedPair) and self.share_prompt:
            batch = collate_pairs_sharing_prompt(chosen, self.pad_id, self.mask_dtype)
            ids = [2 * u for u in units] + [2 * u + 1 for u in units]
        elif isinstance(chosen[0], TokenizedPair):
            batch = collate_padded([p.chosen for p in chosen] + [p.rejected for p in chosen], self.pad_id)
            ids = [2 * u for u in units] + [2 * u + 1 for u in units]
        else:
            examples = [example for example, _ in chosen]
            batch = collate_padded(examples, self.pad_id)
            batch["kto_labels"] = torch.tensor([int(label) for _, label in chosen])
            mismatched = collate_padded([_splice(examples[i], examples[i - 1]) for i in range(len(examples))], self.pad_id)
            batch.update({f"kl_{key}": value for key, value in mismatched.items()})
            ids = list(units)
        batch["example_ids"] = torch.tensor(ids) + self.id_offset
        return batch


def _split_like(flat: list[int], rows: Sequence[Sequence[int]]) -> list[list[int]]:
    """``flat`` cut into consecutive pieces as long as ``rows``' rows."""
    pieces, start = [], 0
    for row in rows:
        pieces.append(flat[start:start + len(row)])
        start += len(row)
    return pieces


def _splice(prompt_from: TokenizedExample, completion_from: TokenizedExample) -> TokenizedExample:
    """One prompt with another example's completion: KTO's mismatched pair (x, y') for its KL estimate."""
    cut_prompt, cut_completion = _prompt_length(prompt_from), _prompt_length(completion_from)
    return TokenizedExample(prompt_from.input_ids[:cut_prompt] + completion_from.input_ids[cut_completion:],
                            [IGNORE_INDEX] * cut_prompt + completion_from.labels[cut_completion:])


def _prompt_length(example: TokenizedExample) -> int:
    return next(i for i, label in enumerate(example.labels) if label != IGNORE_INDEX)


def shared_prompt_length(pair: TokenizedPair) -> int:
    """Tokens chosen and rejected both open with that can be held once. The last prompt token stays
    in each copy: it predicts the answer's first token, a different label in each."""
    chosen, rejected = pair.chosen, pair.rejected
    common = 0
    while common < min(len(chosen), len(rejected)) and chosen.input_ids[common] == rejected.input_ids[common]:
        common += 1
    return max(0, min(common, _prompt_length(chosen) - 1, _prompt_length(rejected) - 1))


def collate_pairs_sharing_prompt(pairs: Sequence[TokenizedPair], pad_id: int, mask_dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """One row per pair: [shared prompt | chosen's rest | rejected's rest] (see collate_pair_rows)."""
    return collate_pair_rows([[pair] for pair in pairs], pad_id, mask_dtype)


def pair_layout_length(pair: TokenizedPair) -> int:
    """Tokens a pair takes in a row that holds its prompt once."""
    shared = shared_prompt_length(pair)
    return shared + (len(pair.chosen) - shared) + (len(pair.rejected) - shared)


def pack_pairs(pairs: Sequence[TokenizedPair], max_seq_len: int) -> list[tuple[int, ...]]:
    """Indices of ``pairs`` grouped into rows of at most ``max_seq_len`` tokens (best-fit-decreasing,
    packing.py); a pair longer than that (each side fits, both together need not) gets a row alone."""
    lengths = [pair_layout_length(p) for p in pairs]
    return pack_examples(lengths, max(max_seq_len, max(lengths)))


def collate_pair_rows(rows: Sequence[Sequence[TokenizedPair]], pad_id: int, mask_dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Rows of one or more pairs, each pair laid out as [shared prompt | chosen's rest | rejected's
    rest]: each answer attends to its own pair's prompt and to itself only, with positions as if it
    were alone, so every answer's log-probs are those of its separate sequence.

    The batch's pairs are numbered j = 0..P-1 row by row, in order. ``label_segments`` (B, T) says
    whose label a position carries: j for pair j's chosen answer, P + j for its rejected one, -1 none,
    matching the [chosen_1..chosen_P, rejected_1..rejected_P] order of the unshared layout."""
    count = sum(len(row) for row in rows)
    layouts = [[(pair, shared_prompt_length(pair)) for pair in row] for row in rows]
    length = max(sum(k + (len(p.chosen) - k) + (len(p.rejected) - k) for p, k in row) for row in layouts)
    shape = (len(rows), length)
    input_ids = torch.full(shape, pad_id, dtype=torch.long)  # (B, T)
    labels = torch.full(shape, IGNORE_INDEX, dtype=torch.long)  # (B, T)
    position_ids = torch.zeros(shape, dtype=torch.long)  # (B, T)
    segment_ids = torch.full(shape, PADDING_SEGMENT, dtype=torch.long)  # (B, T)
    prompt_segments = torch.full(shape, NO_PROMPT, dtype=torch.long)  # (B, T): the segment an answer token's prompt is
    label_segments = torch.full(shape, -1, dtype=torch.long)  # (B, T)
    pair_index = 0
    for row, layout in enumerate(layouts):
        start = 0
        for slot, (pair, k) in enumerate(layout):
            prompt_segment = 3 * slot
            input_ids[row, start:start + k] = torch.tensor(pair.chosen.input_ids[:k], dtype=torch.long)
            position_ids[row, start:start + k] = torch.arange(k)
            segment_ids[row, start:start + k] = prompt_segment
            start += k
            for side_index, side in enumerate((pair.chosen, pair.rejected)):
                end = start + len(side) - k
                input_ids[row, start:end] = torch.tensor(side.input_ids[k:], dtype=torch.long)
                side_labels = torch.tensor(side.labels[k:], dtype=torch.long)
                side_labels[0] = IGNORE_INDEX  # never predicted from the segment before it (it is unlabelled anyway)
                labels[row, start:end] = side_labels
                owner = pair_index + side_index * count
                label_segments[row, start:end] = torch.where(side_labels != IGNORE_INDEX, owner, -1)
                position_ids[row, start:end] = torch.arange(k, len(side))
                segment_ids[row, start:end] = prompt_segment + 1 + side_index
                prompt_segments[row, start:end] = prompt_segment
                start = end
            pair_index += 1
        position_ids[row, start:] = torch.arange(length - start)
    return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids,
            "attention_mask": pair_block_mask(segment_ids, prompt_segments, mask_dtype), "label_segments": label_segments}


NO_PROMPT = -3  # prompt_segments of a token that is not an answer's: matches no segment id


def pair_block_mask(segment_ids: torch.Tensor, prompt_segments: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Additive mask (B, 1, T, T), as collate.block_causal_mask: query t may attend key s <= t of its
    own segment, or of the prompt segment its answer belongs to (``prompt_segments``)."""
    length = segment_ids.shape[1]
    same_segment = segment_ids[:, :, None] == segment_ids[:, None, :]  # (B, T, T)
    own_prompt = prompt_segments[:, :, None] == segment_ids[:, None, :]  # (B, T, T)
    causal = torch.ones((length, length), dtype=torch.bool).tril()  # (T, T)
    allowed = ((same_segment | own_prompt) & causal)[:, None]  # (B, 1, T, T)
    return torch.where(allowed, torch.zeros((), dtype=dtype), torch.tensor(torch.finfo(dtype).min, dtype=dtype))
