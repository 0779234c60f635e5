"""`unit_conversion`: convert a whole quantity to a smaller unit, answered by the number.

    Convert 7 km to m. Answer with just the number.                                  -> "7000"

Every conversion multiplies by a whole factor (1000, 100, 60), so the answer is exact; the split
key is the (value, unit pair), not the wording.
"""

from __future__ import annotations

import random

from tuneforge.data.datasets.splits import Problem, sample_problems
from tuneforge.data.records import Example
from tuneforge.errors import ConfigError

# (from unit, to unit, factor): each converts to a smaller unit by a whole factor.
CONVERSIONS = (("km", "m", 1000), ("m", "cm", 100), ("kg", "g", 1000), ("hours", "minutes", 60),
               ("minutes", "seconds", 60), ("L", "mL", 1000))
DEFAULT_SIZES = {"train": 500, "eval": 100}


def build_unit_conversion(split: str, size: int | None = None, seed: int = 0, max_value: int = 199) -> list[Example]:
    if max_value < 20:
        raise ConfigError(f"Dataset 'unit_conversion': max_value={max_value} is too small; use at least 20")

    def generate(rng: random.Random) -> Problem:
        source, target, factor = rng.choice(CONVERSIONS)
        value = rng.randint(1, max_value)
        question = f"Convert {value} {source} to {target}. Answer with just the number."
        return Problem(question=question, answer=str(value * factor), key=f"{value}{source}>{target}")

    return sample_problems("unit_conversion", generate, split, size or DEFAULT_SIZES[split], seed)
