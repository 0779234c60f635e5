"""`arithmetic`: one- and two-step word problems with small whole numbers, answered by the number.

    Tom has 3 apples. Tom buys 4 more. Sam gives Tom 2 more. How many apples does Tom have now?
    Answer with just the number.                                                        -> "9"

Numbers and every running total stay within 0..max_number (19 by default) so the skill is within
reach of a 135M model after minutes of CPU finetuning, while the answer format (a bare number) is
one a chat model does not produce unprompted: the base model scores poorly on exact match.
"""

from __future__ import annotations

import random

from tuneforge.data.datasets.splits import Problem, sample_problems
from tuneforge.data.records import Example
from tuneforge.errors import ConfigError

NAMES = ("Tom", "Ann", "Sam", "Mia", "Leo", "Ava", "Ben", "Zoe", "Max", "Eva", "Raj", "Lia")
OBJECTS = ("apples", "pencils", "marbles", "stickers", "cookies", "books", "coins", "cards", "shells", "balloons")
GAIN_SENTENCES = ("{name} buys {n} more.", "{name} finds {n} more.", "{friend} gives {name} {n} more.")
LOSS_SENTENCES = ("{name} gives {n} to {friend}.", "{name} loses {n}.")
MAX_STEP = 9
DEFAULT_SIZES = {"train": 1000, "eval": 200}


def build_arithmetic(split: str, size: int | None = None, seed: int = 0, min_operations: int = 1, max_operations: int = 2, max_number: int = 19) -> list[Example]:
    if not 1 <= min_operations <= max_operations:
        raise ConfigError(f"Dataset 'arithmetic': need 1 <= min_operations <= max_operations, got {min_operations} and {max_operations}")
    if max_number < 4:
        raise ConfigError(f"Dataset 'arithmetic': max_number={max_number} is too small; use at least 4")

    def generate(rng: random.Random) -> Problem:
        return _word_problem(rng, rng.randint(min_operations, max_operations), max_number)

    return sample_problems("arithmetic", generate, split, size or DEFAULT_SIZES[split], seed)


def _word_problem(rng: random.Random, operations: int, max_number: int) -> Problem:
    name, friend = rng.sample(NAMES, 2)
    thing = rng.choice(OBJECTS)
    total = rng.randint(1, max_number - 1)
    sentences = [f"{name} has {total} {thing}."]
    expression = str(total)
    for _ in range(operations):
        room_to_add = min(MAX_STEP, max_number - total)
        adds = room_to_add >= 1 and (total == 0 or rng.random() < 0.5)
        if adds:
            n = rng.randint(1, room_to_add)
            total += n
            template = rng.choice(GAIN_SENTENCES)
        else:
            n = rng.randint(1, min(MAX_STEP, total))
            total -= n
            template = rng.choice(LOSS_SENTENCES)
        sentences.append(template.format(name=name, friend=friend, n=n))
        expression += f"{'+' if adds else '-'}{n}"
    sentences.append(f"How many {thing} does {name} have now? Answer with just the number.")
    return Problem(question=" ".join(sentences), answer=str(total), key=expression)
