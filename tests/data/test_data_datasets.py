"""Bundled datasets: fixed disjoint splits, seeded determinism, answers that recompute correctly."""

from __future__ import annotations

import re

import pytest

from tuneforge.data import get_dataset, list_datasets
from tuneforge.data.datasets import corpus_languages
from tuneforge.errors import ConfigError

SYNTHETIC = ("arithmetic", "state_tracking")


def _question(example) -> str:
    return example.messages[0].content


def _solve_arithmetic(question: str) -> tuple[int, str]:
    """Recompute the answer from the wording alone; also return the abstract expression."""
    sentences = re.split(r"(?<=\.) ", question)
    total = int(re.fullmatch(r"\w+ has (\d+) \w+\.", sentences[0]).group(1))
    expression = str(total)
    for sentence in sentences[1:]:
        if gain := re.fullmatch(r"(?:\w+ buys|\w+ finds|\w+ gives \w+) (\d+) more\.", sentence):
            total += int(gain.group(1))
            expression += f"+{gain.group(1)}"
        elif loss := re.fullmatch(r"\w+ (?:gives (\d+) to \w+|loses (\d+))\.", sentence):
            amount = loss.group(1) or loss.group(2)
            total -= int(amount)
            expression += f"-{amount}"
        else:
            assert sentence.startswith("How many"), sentence
        assert 0 <= total <= 19
    return total, expression


def _solve_boxes(question: str) -> tuple[str, str]:
    box_of = {item: box for item, box in re.findall(r"the (\w+) is in box (\d)", question, flags=re.IGNORECASE)}
    order = list(box_of)  # items in the order they are introduced
    moves = re.findall(r"Move the (\w+) to box (\d)\.", question)
    for item, box in moves:
        assert box_of[item] != box  # a move always changes the box
        box_of[item] = box
    asked = re.search(r"Which box holds the (\w+)\?", question).group(1)
    structure = f"{len(order)}|" + ",".join(f"{order.index(item)}>{box}" for item, box in moves) + f"|{order.index(asked)}"
    return f"box {box_of[asked]}", structure


def test_registry_lists_the_bundled_datasets():
    assert {"arithmetic", "state_tracking", "chatterbot"} <= set(list_datasets())


@pytest.mark.parametrize("name", SYNTHETIC)
def test_splits_are_disjoint_even_in_structure_and_across_seeds(name):
    solve = _solve_arithmetic if name == "arithmetic" else _solve_boxes
    train = get_dataset(name, split="train") + get_dataset(name, split="train", seed=1)
    evaluation = get_dataset(name, split="eval")
    assert not {_question(e) for e in train} & {_question(e) for e in evaluation}
    # Renamed copies of a held-out problem never reach train either.
    assert not {solve(_question(e))[1] for e in train} & {solve(_question(e))[1] for e in evaluation}


@pytest.mark.parametrize("name", SYNTHETIC)
def test_seeded_determinism_and_sizes(name):
    first = get_dataset(name, split="train", size=50, seed=3)
    assert get_dataset(name, split="train", size=50, seed=3) == first
    assert get_dataset(name, split="train", size=50, seed=4) != first
    assert len(first) == 50 and len({_question(e) for e in first}) == 50
    assert len(get_dataset(name, split="eval")) == 200


def test_arithmetic_answers_recompute_and_are_bare_numbers():
    for example in get_dataset("arithmetic", split="train", size=300) + get_dataset("arithmetic", split="eval"):
        total, _ = _solve_arithmetic(_question(example))
        assert example.answer == str(total) == example.messages[-1].content
        assert [m.role for m in example.messages] == ["user", "assistant"]
        assert example.prompt_messages == example.messages[:1]


def test_arithmetic_mixes_one_and_two_operation_problems():
    operations = {len(re.findall(r"[+-]", _solve_arithmetic(_question(e))[1])) for e in get_dataset("arithmetic", size=100)}
    assert operations == {1, 2}


def test_state_tracking_answers_recompute():
    examples = get_dataset("state_tracking", split="train", size=300) + get_dataset("state_tracking", split="eval")
    for example in examples:
        answer, _ = _solve_boxes(_question(example))
        assert example.answer == answer == example.messages[-1].content
        assert re.fullmatch(r"box [1-3]", example.answer)
    move_counts = {len(re.findall("Move the", _question(e))) for e in examples}
    assert move_counts == {2, 3, 4}
    assert {e.answer for e in examples} == {"box 1", "box 2", "box 3"}


def test_exhausted_problem_space_is_reported():
    with pytest.raises(ConfigError, match="could only generate .* of the 5000 asked"):
        get_dataset("arithmetic", size=5000, max_operations=1)


def test_chatterbot_english_by_default_with_alternating_turns():
    train = get_dataset("chatterbot")
    evaluation = get_dataset("chatterbot", split="eval")
    assert len(train) > 500 and len(evaluation) > 50
    assert any(e.messages[0].content == "What is AI?" for e in train + evaluation)
    for example in train + evaluation:
        roles = [m.role for m in example.messages]
        assert roles == ["user", "assistant"] * (len(roles) // 2) and roles
    assert any(len(e.messages) > 2 for e in train)  # multi-turn conversations survive
    as_text = lambda examples: {tuple((m.role, m.content) for m in e.messages) for e in examples}  # noqa: E731
    assert not as_text(train) & as_text(evaluation)
    assert "/english/" in str(train[0].origin)


def test_chatterbot_language_option_and_size():
    spanish = get_dataset("chatterbot", language="spanish", size=20, seed=0)
    assert len(spanish) == 20 and all("/spanish/" in str(e.origin) for e in spanish)
    assert get_dataset("chatterbot", language="spanish", size=20, seed=0) == spanish
    assert {"english", "spanish", "german"} <= set(corpus_languages())


def test_chatterbot_unknown_language_lists_the_available_ones():
    with pytest.raises(ConfigError, match="no language 'klingon'; available: .*english.*spanish"):
        get_dataset("chatterbot", language="klingon")


def test_unknown_dataset_split_and_option():
    with pytest.raises(ConfigError, match="Unknown bundled dataset 'gsm8k'; available: arithmetic, chatterbot, date_format, json_extraction, state_tracking, string_reversal, unit_conversion"):
        get_dataset("gsm8k")
    with pytest.raises(ConfigError, match="split='test'"):
        get_dataset("arithmetic", split="test")
    with pytest.raises(ConfigError, match=r"no option\(s\) \['langauge'\].*language='english'"):
        get_dataset("chatterbot", langauge="english")
