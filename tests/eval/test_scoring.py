"""Answer normalisation, exact match, whole-word containment, and the missing-answer error."""

from __future__ import annotations

import pytest
from eval_helpers import qa_example

from tuneforge.data import Example
from tuneforge.errors import DataError
from tuneforge.eval import contains, exact_match, generation, normalize_answer, score_generation


@pytest.mark.parametrize("prediction, gold, expected", [
    ("7", "7", True),
    ("  7. ", "7", True),           # surrounding space and one trailing period dropped
    ("Box   2", "box 2", True),     # case and runs of whitespace
    ("box\n2", "box 2", True),
    ("7..", "7", False),            # only one period is dropped
    ("17", "7", False),
    ("The answer is 7", "7", False),
    ("", "7", False),
    ("", "", True),
])
def test_exact_match(prediction, gold, expected):
    assert exact_match(prediction, gold) is expected


@pytest.mark.parametrize("prediction, gold, expected", [
    ("The answer is 7.", "7", True),
    ("7", "7", True),
    ("x=7, so", "7", True),
    ("(7)", "7", True),
    ("17", "7", False),             # part of a larger number
    ("71 apples", "7", False),
    ("the 7th day", "7", False),    # part of a word
    ("7.5 apples", "7", False),     # decimal point joining more digits
    ("1,700", "7", False),
    ("It is in BOX 2.", "box 2", True),
    ("box 22", "box 2", False),
    ("", "7", False),
    ("anything", "", False),        # an empty gold answer is never "contained"
])
def test_contains_matches_whole_words_and_numbers(prediction, gold, expected):
    assert contains(prediction, gold) is expected


def test_normalize_answer():
    assert normalize_answer("  The Answer\t is\n 7. ") == "the answer is 7"


def test_score_generation_fractions(monkeypatch, qa_examples):
    golds = [example.answer for example in qa_examples]  # 7, 7, box 2, fine, 3
    predictions = ["7", "It is 7.", "box 2.", "17", "Box 3"]
    monkeypatch.setattr(generation, "generate_answers", lambda *args, **kwargs: predictions)
    score = score_generation(None, _NoTemplateTokenizer(), qa_examples, template="plain", num_samples=2)
    assert score.n == 5
    assert score.exact_match == pytest.approx(2 / 5)  # "7", "box 2."
    assert score.contains == pytest.approx(4 / 5)     # all but "17"
    assert [(prediction, gold) for _, prediction, gold in score.samples] == list(zip(predictions, golds))[:2]
    assert score.samples[0][0].startswith("Hi\n")  # the rendered prompt (plain template)


def test_plain_text_examples_raise_a_data_error_suggesting_loss():
    examples = [qa_example("What is 2+3?", "5"), Example(text="raw pretraining text")]
    with pytest.raises(DataError) as error:
        score_generation(None, None, examples)
    message = str(error.value)
    assert "final assistant turn" in message and "1 of 2" in message
    assert "--metrics loss" in message and "messages" in message


class _NoTemplateTokenizer:
    """Just enough of a tokenizer for rendering with a built-in template."""

    eos_token = "<eos>"
    eos_token_id = 1
    chat_template = None
    all_special_tokens = ["<eos>"]
