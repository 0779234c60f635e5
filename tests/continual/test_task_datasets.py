"""The synthetic tasks of the bundled streams: answers recomputed here from the question text,
fixed disjoint splits, and the same examples on every call."""

from __future__ import annotations

import datetime
import json
import re

import pytest

from tuneforge.continual.streams import STREAMS
from tuneforge.data import get_dataset
from tuneforge.errors import ConfigError

NEW_TASKS = ("date_format", "unit_conversion", "string_reversal", "json_extraction")
FACTORS = {("km", "m"): 1000, ("m", "cm"): 100, ("kg", "g"): 1000, ("hours", "minutes"): 60,
           ("minutes", "seconds"): 60, ("L", "mL"): 1000}


def question(example):
    return example.messages[0].content


def recompute(task, text):
    if task == "date_format":
        day = datetime.date.fromisoformat(re.search(r"\d{4}-\d{2}-\d{2}", text).group())
        months = ["January", "February", "March", "April", "May", "June", "July", "August", "September",
                  "October", "November", "December"]
        return f"{months[day.month - 1]} {day.day}, {day.year}"
    if task == "unit_conversion":
        value, source, target = re.match(r"Convert (\d+) (\S+) to (\S+)\.", text).groups()
        return str(int(value) * FACTORS[(source, target)])
    if task == "string_reversal":
        return "".join(reversed(re.search(r"'([a-z]+)'", text).group(1)))
    record_text, field = re.match(r'(\{.*\}) What is the value of "(\w+)"', text).groups()
    return str(json.loads(record_text)[field])


@pytest.mark.parametrize("task", NEW_TASKS)
def test_answers_are_right_and_splits_fixed_and_disjoint(task):
    train = get_dataset(task, split="train", size=60)
    held_out = get_dataset(task, split="eval", size=30)
    for example in train + held_out:
        assert example.answer == example.messages[-1].content == recompute(task, question(example))
    assert not {question(e) for e in train} & {question(e) for e in held_out}
    assert [question(e) for e in get_dataset(task, split="train", size=60)] == [question(e) for e in train]
    assert len({question(e) for e in train}) == 60


def test_every_bundled_stream_has_at_least_four_registered_tasks():
    for tasks in STREAMS.values():
        assert len(tasks) >= 4 and len(set(tasks)) == len(tasks)
        for task in tasks:
            assert get_dataset(task, split="eval", size=2)


def test_bad_task_options_are_named():
    with pytest.raises(ConfigError, match="date_format.*first_year"):
        get_dataset("date_format", first_year=2030, last_year=2000)
