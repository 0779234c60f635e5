"""Packing: put several tokenized examples into one row of at most `max_seq_len` tokens.

Rows are filled best-fit-decreasing: examples are taken longest first and each goes into the open
row with the least room that still fits it (a new row when none does). Short examples then fill
the gaps left by long ones, which keeps padding to a few percent on typical SFT length
distributions. The result depends only on the lengths, so it is identical on every run.

How a packed row is kept equivalent to its examples run one by one lives in collate.py.

Shared prefixes: SFT examples usually open with the same tokens (the template's system prompt,
e.g. SmolLM2's 20-token default, then the user turn's header). With `shared_prefix_length` > 0,
each row holds those tokens once and every example of the row only its own remainder; the
attention mask lets each remainder see the shared copy (collate.py). Rows are then packed from
the remainders' lengths into `max_seq_len - prefix` tokens, so more examples fit in a row.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence

from tuneforge.data.tokenization import IGNORE_INDEX
from tuneforge.errors import DataError


def pack_examples(lengths: Sequence[int], max_seq_len: int) -> list[tuple[int, ...]]:
    """Group example indices into rows whose lengths sum to at most `max_seq_len`."""
    too_long = [index for index, length in enumerate(lengths) if length > max_seq_len]
    if too_long:
        first = too_long[0]
        raise DataError(
            f"{len(too_long)} example(s) are longer than max_seq_len={max_seq_len} (e.g. index {first}, "
            f"{lengths[first]} tokens); tokenize with the same max_seq_len as packing."
        )
    rows: list[list[int]] = []
    rows_by_room: dict[int, list[int]] = {}  # free room -> ids of rows with exactly that much room
    rooms: list[int] = []  # the keys of rows_by_room, sorted, so the best fit is one bisect away
    for index in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        length = lengths[index]
        position = bisect.bisect_left(rooms, length)
        if position == len(rooms):
            row, room = len(rows), max_seq_len
            rows.append([])
        else:
            room = rooms[position]
            row = rows_by_room[room].pop()
            if not rows_by_room[room]:
                del rows_by_room[room]
                rooms.pop(position)
        rows[row].append(index)
        room -= length
        if room > 0:
            if room not in rows_by_room:
                bisect.insort(rooms, room)
                rows_by_room[room] = []
            rows_by_room[room].append(row)
    return [tuple(row) for row in rows]


def padding_fraction(lengths: Sequence[int], rows: Sequence[Sequence[int]], row_length: int) -> float:
    """Share of the `len(rows) * row_length` token slots that hold padding."""
    if not rows:
        return 0.0
    return 1.0 - sum(lengths[index] for row in rows for index in row) / (len(rows) * row_length)


# Below this many tokens a shared prefix saves less than the bookkeeping is worth explaining.
MIN_SHARED_PREFIX = 4


def shared_prefix_length(examples: Sequence, minimum: int = MIN_SHARED_PREFIX) -> int:
    """Tokens every example starts with (a fixed system prompt and the template's opening) that
    carry no loss, or 0 when that is shorter than `minimum`.

    The prefix stops before the first labelled token of every example, with one more unlabelled
    token after it: that token is each example's first token after the prefix, which the shared
    last prefix position would otherwise have to predict differently for each example. Examples
    are `TokenizedExample`s (`input_ids`, `labels`).
    """
    if len(examples) < 2:
        return 0
    first = examples[0].input_ids
    length = min(len(example) for example in examples) - 1  # every example keeps a token of its own
    for example in examples[1:]:
        ids = example.input_ids
        common = 0
        while common < length and ids[common] == first[common]:
            common += 1
        length = common
    for example in examples:
        labelled = next((t for t, label in enumerate(example.labels) if label != IGNORE_INDEX), len(example))
        length = min(length, labelled - 1)
    return length if length >= minimum else 0
