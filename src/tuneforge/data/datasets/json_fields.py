"""`json_extraction`: read one field's value out of a small JSON object.

    {"name": "Mia", "city": "Oslo", "age": 31} What is the value of "city"? Answer with just the value.  -> "Oslo"

The split key is the object and the asked field, so an eval object never appears in training.
"""

from __future__ import annotations

import json
import random

from tuneforge.data.datasets.splits import Problem, sample_problems
from tuneforge.data.records import Example
from tuneforge.errors import ConfigError

FIELD_VALUES = {
    "name": ("Tom", "Ann", "Sam", "Mia", "Leo", "Ava", "Ben", "Zoe", "Max", "Eva"),
    "city": ("Oslo", "Lima", "Rome", "Kyiv", "Pune", "Bern", "Doha", "Riga", "Cork", "Nice"),
    "color": ("red", "blue", "green", "black", "white", "pink", "gray", "gold"),
    "pet": ("cat", "dog", "fish", "bird", "frog", "hamster"),
    "age": tuple(str(age) for age in range(18, 80)),
}
DEFAULT_SIZES = {"train": 1000, "eval": 200}


def build_json_extraction(split: str, size: int | None = None, seed: int = 0, min_fields: int = 2, max_fields: int = 4) -> list[Example]:
    if not 1 <= min_fields <= max_fields <= len(FIELD_VALUES):
        raise ConfigError(f"Dataset 'json_extraction': need 1 <= min_fields <= max_fields <= {len(FIELD_VALUES)}, "
                          f"got {min_fields} and {max_fields}")

    def generate(rng: random.Random) -> Problem:
        fields = rng.sample(sorted(FIELD_VALUES), rng.randint(min_fields, max_fields))
        record = {field: rng.choice(FIELD_VALUES[field]) for field in fields}
        asked = rng.choice(fields)
        text = json.dumps(record)
        question = f'{text} What is the value of "{asked}"? Answer with just the value.'
        return Problem(question=question, answer=record[asked], key=f"{text}|{asked}")

    return sample_problems("json_extraction", generate, split, size or DEFAULT_SIZES[split], seed)
