"""Each format converts to the expected messages or text, and is detected from its keys."""

from __future__ import annotations

import re

import pytest

from tuneforge.data import Message, load_examples
from tuneforge.errors import ConfigError, DataError

FORMAT_CASES = {
    "alpaca": (
        {"instruction": "Translate", "input": "chat", "output": "cat", "system": "Be exact."},
        [("system", "Be exact."), ("user", "Translate\n\nchat"), ("assistant", "cat")],
    ),
    "sharegpt": (
        {"conversations": [{"from": "system", "value": "S"}, {"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}, {"from": "human", "value": "Bye"}, {"from": "gpt", "value": "Ciao"}]},
        [("system", "S"), ("user", "Hi"), ("assistant", "Hello"), ("user", "Bye"), ("assistant", "Ciao")],
    ),
    "messages": (
        {"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1"}, {"role": "user", "content": "Q2"}, {"role": "assistant", "content": "A2"}]},
        [("system", "S"), ("user", "Q1"), ("assistant", "A1"), ("user", "Q2"), ("assistant", "A2")],
    ),
    "prompt_completion": (
        {"prompt": "2+2=", "completion": "4"},
        [("user", "2+2="), ("assistant", "4")],
    ),
}


@pytest.mark.parametrize("name", sorted(FORMAT_CASES))
@pytest.mark.parametrize("given", [True, False], ids=["explicit", "detected"])
def test_chat_formats_convert_to_messages(name, given, write_jsonl):
    record, expected = FORMAT_CASES[name]
    path = write_jsonl([record, record])
    examples = load_examples(path, format=name if given else None).examples
    assert [(m.role, m.content) for m in examples[0].messages] == expected


@pytest.mark.parametrize("given", [True, False], ids=["explicit", "detected"])
def test_text_format(given, write_jsonl):
    path = write_jsonl([{"text": "Once upon a time."}, {"text": "The end."}])
    examples = load_examples(path, format="text" if given else None).examples
    assert [e.text for e in examples] == ["Once upon a time.", "The end."]
    assert all(e.messages is None for e in examples)


def test_alpaca_without_input_or_system(write_jsonl):
    (example,) = load_examples(write_jsonl([{"instruction": "Hi", "output": "Hello", "input": None}])).examples
    assert example.messages == (Message("user", "Hi"), Message("assistant", "Hello"))


def test_openai_text_content_parts_are_joined(write_jsonl):
    record = {"messages": [{"role": "user", "content": [{"type": "text", "text": "Hel"}, {"type": "text", "text": "lo"}]}, {"role": "assistant", "content": "Hi"}]}
    (example,) = load_examples(write_jsonl([record])).examples
    assert example.messages[0].content == "Hello"


def test_detection_is_not_decided_by_one_bad_first_record(write_jsonl):
    path = write_jsonl([{"instruction": "no output"}, {"prompt": "p", "completion": "c"}, {"prompt": "q", "completion": "d"}])
    result = load_examples(path, on_bad_record="skip")
    assert [e.messages[-1].content for e in result.examples] == ["c", "d"]
    assert result.skipped == 1


def test_ambiguous_format_lists_the_candidates(write_jsonl):
    path = write_jsonl([{"text": "t", "prompt": "p", "completion": "c"}])
    with pytest.raises(DataError) as error:
        load_examples(path)
    message = str(error.value)
    assert "ambiguous" in message and str(path) in message
    assert "prompt_completion: prompt, completion" in message and "text: text" in message
    assert "format=" in message


def test_unknown_shape_lists_every_format_and_its_keys(write_jsonl):
    path = write_jsonl([{"question": "q", "answer": "a"}])
    with pytest.raises(DataError) as error:
        load_examples(path)
    message = str(error.value)
    assert str(path) in message and "['answer', 'question']" in message
    for expected in ("alpaca: instruction, output", "sharegpt: conversations", "messages: messages", "prompt_completion: prompt, completion", "text: text"):
        assert expected in message


def test_unknown_format_name(write_jsonl):
    with pytest.raises(ConfigError, match="(?s)Unknown data format 'chatml'.*alpaca"):
        load_examples(write_jsonl([{"text": "x"}]), format="chatml")


def test_forced_format_that_does_not_fit_reports_the_missing_key(write_jsonl):
    path = write_jsonl([{"text": "x"}])
    with pytest.raises(DataError, match=re.escape(f"{path}:1: missing the field 'instruction'")):
        load_examples(path, format="alpaca")
