"""`date_format`: rewrite an ISO date in words, a format conversion with one right answer.

    Write the date 2014-03-07 in the form 'Month D, YYYY'.                      -> "March 7, 2014"

The split key is the date itself, so no eval date is ever seen in training, in any wording.
"""

from __future__ import annotations

import datetime
import random

from tuneforge.data.datasets.splits import Problem, sample_problems
from tuneforge.data.records import Example
from tuneforge.errors import ConfigError

DEFAULT_SIZES = {"train": 1000, "eval": 200}


def build_date_format(split: str, size: int | None = None, seed: int = 0, first_year: int = 1950, last_year: int = 2049) -> list[Example]:
    if not 1 <= first_year <= last_year <= 9999:
        raise ConfigError(f"Dataset 'date_format': need 1 <= first_year <= last_year <= 9999, got {first_year} and {last_year}")
    start = datetime.date(first_year, 1, 1).toordinal()
    end = datetime.date(last_year, 12, 31).toordinal()

    def generate(rng: random.Random) -> Problem:
        day = datetime.date.fromordinal(rng.randint(start, end))
        question = f"Write the date {day.isoformat()} in the form 'Month D, YYYY'."
        return Problem(question=question, answer=f"{day:%B} {day.day}, {day.year}", key=day.isoformat())

    return sample_problems("date_format", generate, split, size or DEFAULT_SIZES[split], seed)
