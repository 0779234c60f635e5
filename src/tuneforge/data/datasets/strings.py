"""`string_reversal`: spell a made-up lowercase word backwards.

    Reverse the letters of 'kemsa'. Answer with just the reversed word.               -> "asmek"

Words are random letter strings, so the skill cannot be recalled from pretraining; the split key
is the word.
"""

from __future__ import annotations

import random
import string

from tuneforge.data.datasets.splits import Problem, sample_problems
from tuneforge.data.records import Example
from tuneforge.errors import ConfigError

DEFAULT_SIZES = {"train": 1000, "eval": 200}


def build_string_reversal(split: str, size: int | None = None, seed: int = 0, min_length: int = 3, max_length: int = 6) -> list[Example]:
    if not 2 <= min_length <= max_length <= 40:
        raise ConfigError(f"Dataset 'string_reversal': need 2 <= min_length <= max_length <= 40, got {min_length} and {max_length}")

    def generate(rng: random.Random) -> Problem:
        word = "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(min_length, max_length)))
        question = f"Reverse the letters of '{word}'. Answer with just the reversed word."
        return Problem(question=question, answer=word[::-1], key=word)

    return sample_problems("string_reversal", generate, split, size or DEFAULT_SIZES[split], seed)
