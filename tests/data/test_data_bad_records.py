"""Bad records name their file and 1-based line and what was expected; `skip` drops and counts them."""

from __future__ import annotations

import logging

import pytest

from tuneforge.data import load_examples
from tuneforge.errors import DataError

GOOD = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}

# name -> (the bad line as written to the file, words the message must contain)
BAD_LINES = {
    "missing field": ({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant"}]}, "messages[1].content must be a string, got missing"),
    "missing top-level field": ({"conversation": []}, "missing the field 'messages'"),
    "wrong type": ({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": 42}]}, "messages[1].content must be a string, got int (42)"),
    "wrong container type": ({"messages": {"role": "user"}}, "field 'messages' must be a list of {role, content} messages, got dict"),
    "empty conversation": ({"messages": []}, "empty conversation"),
    "no assistant turn": ({"messages": [{"role": "user", "content": "Hi"}]}, "has no assistant turn"),
    "unknown role": ({"messages": [{"role": "bot", "content": "Hi"}, {"role": "assistant", "content": "x"}]}, "messages[0].role is 'bot'"),
    "not an object": ([1, 2], "expected a JSON object"),
    "non-UTF-8 line": (b'{"messages": "caf\xe9"}', "not valid UTF-8 (byte 0xe9"),
    "invalid JSON": ('{"messages": [', "invalid JSON"),
}


@pytest.mark.parametrize("case", sorted(BAD_LINES))
def test_error_names_file_line_and_expectation(case, write_jsonl):
    bad, expected_words = BAD_LINES[case]
    path = write_jsonl([GOOD, GOOD, bad, GOOD])
    with pytest.raises(DataError) as error:
        load_examples(path, format="messages")
    message = str(error.value)
    assert f"{path}:3: " in message
    assert expected_words in message
    assert "on_bad_record='skip'" in message  # how to proceed anyway


@pytest.mark.parametrize("case", sorted(BAD_LINES))
def test_skip_drops_counts_and_warns_with_location(case, write_jsonl, caplog):
    bad, expected_words = BAD_LINES[case]
    path = write_jsonl([GOOD, bad, GOOD, bad])
    with caplog.at_level(logging.WARNING, logger="tuneforge.data"):
        result = load_examples(path, format="messages", on_bad_record="skip")
    assert len(result.examples) == 2 and [e.origin.number for e in result.examples] == [1, 3]
    assert result.skipped == 2
    assert result.problems[0].startswith(f"{path}:2: ") and result.problems[1].startswith(f"{path}:4: ")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "Skipped 2 bad record(s)" in warnings[0] and f"{path}:2" in warnings[0] and expected_words in warnings[0]


def test_all_problems_are_reported_together_with_a_cap(write_jsonl):
    path = write_jsonl([GOOD] + [{"messages": []}] * 8)
    with pytest.raises(DataError) as error:
        load_examples(path)
    message = str(error.value)
    assert message.startswith(f"8 bad record(s) in {path}")
    assert f"{path}:6:" in message and f"{path}:7:" not in message
    assert "... and 3 more" in message


def test_every_record_bad_under_skip_is_still_an_error(write_jsonl):
    with pytest.raises(DataError, match="no usable examples.*2 bad records were skipped"):
        load_examples(write_jsonl(['{"messages": []}', "{oops"]), format="messages", on_bad_record="skip")


def test_unknown_policy(write_jsonl):
    with pytest.raises(ValueError, match="on_bad_record='ignore' is not one of"):
        load_examples(write_jsonl([GOOD]), on_bad_record="ignore")


def test_csv_bad_row_reports_its_line(tmp_path):
    path = tmp_path / "data.csv"
    path.write_bytes(b"prompt,completion\nq1,a1\nq2,\nq3,caf\xe9\nq4,a4,extra\nq5,a5\n")
    with pytest.raises(DataError) as error:
        load_examples(path)
    message = str(error.value)
    assert f"{path}:3: field 'completion' is empty" in message
    assert f"{path}:4: the row is not valid UTF-8" in message
    assert f"{path}:5: the row has 3 cells but the header has 2 columns" in message
    result = load_examples(path, on_bad_record="skip")
    assert [e.origin.number for e in result.examples] == [2, 6] and result.skipped == 3


def test_parquet_bad_row_reports_its_row_number(tmp_path):
    pyarrow = pytest.importorskip("pyarrow")
    import pyarrow.parquet as parquet

    path = tmp_path / "data.parquet"
    parquet.write_table(pyarrow.table({"prompt": ["a", "b", "c"], "completion": ["x", None, "z"]}), path)
    with pytest.raises(DataError, match=f"{path} row 2: missing the field 'completion'"):
        load_examples(path)


def test_json_file_that_does_not_parse_names_the_line(tmp_path):
    path = tmp_path / "data.json"
    path.write_text('[\n  {"text": "a"},\n  {"text": "b",}\n]')
    with pytest.raises(DataError, match=f"{path}:3: invalid JSON"):
        load_examples(path)


def test_json_file_that_is_not_utf8_names_the_line(tmp_path):
    path = tmp_path / "data.json"
    path.write_bytes(b'[\n{"text": "a"},\n{"text": "caf\xe9"}\n]')
    with pytest.raises(DataError, match=f"{path}:3: the file is not valid UTF-8"):
        load_examples(path)


def test_bad_record_in_json_list_names_its_line(tmp_path):
    path = tmp_path / "data.json"
    path.write_text('[\n  {"text": "a"},\n  {"text": 5}\n]')
    with pytest.raises(DataError, match=f"{path}:3: field 'text' must be a string, got int"):
        load_examples(path)
