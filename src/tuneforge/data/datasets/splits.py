"""Fixed, disjoint train/eval splits for generated and bundled datasets.

Which split an item belongs to is a pure function of a *split key* (a hash), not of the seed or
of the requested sizes, so an eval example can never appear in train under any options. For the
synthetic tasks the key is the abstract problem (the numbers and operations, the moves), not its
wording, so eval measures the skill on computations the model never saw, not on renamed copies.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable
from dataclasses import dataclass

from tuneforge.data.records import Origin, chat_example, Example
from tuneforge.errors import ConfigError

# One item in five is held out for evaluation.
EVAL_BUCKETS, TOTAL_BUCKETS = 1, 5
# Sampling gives up after this many draws in a row that bring nothing new: the problem space is
# then (nearly) exhausted for the size asked, and looping forever would hide that.
MAX_FRUITLESS_DRAWS = 20_000


def split_of(key: str) -> str:
    bucket = int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big") % TOTAL_BUCKETS
    return "eval" if bucket < EVAL_BUCKETS else "train"


@dataclass(frozen=True)
class Problem:
    """A question with a short checkable answer; `key` is the abstract problem used for splitting."""

    question: str
    answer: str
    key: str


def sample_problems(task: str, generate: Callable[[random.Random], Problem], split: str, size: int, seed: int) -> list[Example]:
    """`size` distinct problems of `split`, drawn with a generator seeded from (task, split, seed)."""
    if not isinstance(size, int) or size < 1:
        raise ConfigError(f"Dataset {task!r}: size={size!r} must be a positive integer")
    rng = random.Random(f"{task}:{split}:{seed}")
    seen_keys: set[str] = set()
    examples: list[Example] = []
    fruitless = 0
    while len(examples) < size:
        problem = generate(rng)
        if problem.key in seen_keys or split_of(problem.key) != split:
            fruitless += 1
            if fruitless > MAX_FRUITLESS_DRAWS:
                raise ConfigError(f"Dataset {task!r} could only generate {len(examples)} distinct {split} problems of the {size} asked; lower size or widen the task options.")
            continue
        fruitless = 0
        seen_keys.add(problem.key)
        origin = Origin(f"{task}/{split}", len(examples) + 1, unit="index")
        examples.append(chat_example([("user", problem.question), ("assistant", problem.answer)], origin, answer=problem.answer))
    return examples
