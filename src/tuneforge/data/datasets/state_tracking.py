"""`state_tracking`: follow items moved between boxes, then name the box that holds one of them.

    There are 3 boxes. The key is in box 1, the coin is in box 2, and the ring is in box 3.
    Move the key to box 3. Move the coin to box 1. Which box holds the key?
    Answer in the form 'box N'.                                            -> "box 3"

The answer is the target of the last move of the asked item (or its starting box), a rule a small
model picks up within minutes, while guessing scores about 1 in `num_boxes`.
"""

from __future__ import annotations

import random

from tuneforge.data.datasets.splits import Problem, sample_problems
from tuneforge.data.records import Example
from tuneforge.errors import ConfigError

ITEMS = ("key", "coin", "ring", "ball", "card", "stone", "pen", "shell")
DEFAULT_SIZES = {"train": 1000, "eval": 200}


def build_state_tracking(split: str, size: int | None = None, seed: int = 0, num_boxes: int = 3, min_moves: int = 2, max_moves: int = 4) -> list[Example]:
    if not 2 <= num_boxes <= len(ITEMS):
        raise ConfigError(f"Dataset 'state_tracking': num_boxes={num_boxes} must be between 2 and {len(ITEMS)}")
    if not 1 <= min_moves <= max_moves:
        raise ConfigError(f"Dataset 'state_tracking': need 1 <= min_moves <= max_moves, got {min_moves} and {max_moves}")

    def generate(rng: random.Random) -> Problem:
        return _box_problem(rng, num_boxes, rng.randint(min_moves, max_moves))

    return sample_problems("state_tracking", generate, split, size or DEFAULT_SIZES[split], seed)


def _box_problem(rng: random.Random, num_boxes: int, moves: int) -> Problem:
    # Item i starts in box i + 1; the split key uses item indices, not names, so renaming items
    # cannot carry an eval problem into train.
    items = rng.sample(ITEMS, num_boxes)
    box_of = {index: index + 1 for index in range(num_boxes)}
    placements = [f"the {item} is in box {box_of[index]}" for index, item in enumerate(items)]
    sentences = [f"There are {num_boxes} boxes.", _sentence(placements)]
    key_moves = []
    for _ in range(moves):
        index = rng.randrange(num_boxes)
        target = rng.choice([box for box in range(1, num_boxes + 1) if box != box_of[index]])
        box_of[index] = target
        sentences.append(f"Move the {items[index]} to box {target}.")
        key_moves.append(f"{index}>{target}")
    asked = rng.randrange(num_boxes)
    sentences.append(f"Which box holds the {items[asked]}? Answer in the form 'box N'.")
    key = f"{num_boxes}|{','.join(key_moves)}|{asked}"
    return Problem(question=" ".join(sentences), answer=f"box {box_of[asked]}", key=key)


def _sentence(clauses: list[str]) -> str:
    joined = ", ".join(clauses[:-1]) + f", and {clauses[-1]}" if len(clauses) > 2 else " and ".join(clauses)
    return joined[0].upper() + joined[1:] + "."
