"""Every source type reads the same records, in a deterministic order, with correct origins."""

from __future__ import annotations

import builtins
import json

import pytest

from tuneforge.data import Example, Message, load_examples
from tuneforge.errors import DataError, MissingPackageError

RECORDS = [
    {"instruction": "Say hi", "input": "", "output": "Hi"},
    {"instruction": "Add", "input": "2 and 3", "output": "5"},
    {"instruction": "Name a color", "output": "Blue"},
]
EXPECTED_USER_TURNS = ["Say hi", "Add\n\n2 and 3", "Name a color"]


def _user_and_reply(example: Example) -> tuple[str, str]:
    user = [m.content for m in example.messages if m.role == "user"]
    reply = [m.content for m in example.messages if m.role == "assistant"]
    return user[0], reply[0]


def _check_alpaca_examples(examples):
    assert [_user_and_reply(e) for e in examples] == list(zip(EXPECTED_USER_TURNS, ["Hi", "5", "Blue"]))


def test_jsonl(write_jsonl):
    path = write_jsonl(RECORDS)
    result = load_examples(path)
    _check_alpaca_examples(result.examples)
    assert [e.origin.number for e in result.examples] == [1, 2, 3]
    assert str(result.examples[1].origin) == f"{path}:2"
    assert result.skipped == 0


def test_jsonl_blank_lines_are_ignored_but_counted_for_line_numbers(write_jsonl):
    path = write_jsonl([RECORDS[0], "", "   ", RECORDS[1]])
    assert [e.origin.number for e in load_examples(path).examples] == [1, 4]


def test_json_list_reports_the_line_each_record_starts_on(tmp_path):
    path = tmp_path / "data.json"
    path.write_text(json.dumps(RECORDS, indent=2))
    examples = load_examples(path).examples
    _check_alpaca_examples(examples)
    lines = path.read_text().splitlines()
    for example, record in zip(examples, RECORDS):
        # The reported line holds the record's opening brace, and the next line its first key.
        assert lines[example.origin.number - 1].strip() == "{"
        assert json.dumps(record["instruction"]) in lines[example.origin.number]


def test_json_data_wrapper(tmp_path):
    path = tmp_path / "data.json"
    path.write_text('{"version": 1, "meta": {"data": [1]},\n "data": [\n' + ",\n".join(json.dumps(r) for r in RECORDS) + "\n]}")
    examples = load_examples(path).examples
    _check_alpaca_examples(examples)
    assert [e.origin.number for e in examples] == [3, 4, 5]


def test_json_of_wrong_shape_is_an_error(tmp_path):
    path = tmp_path / "data.json"
    path.write_text('{"rows": []}')
    with pytest.raises(DataError, match=r"data\.json.*list of records.*keys \['rows'\]"):
        load_examples(path)


def test_csv_and_tsv(tmp_path):
    for name, delimiter in (("data.csv", ","), ("data.tsv", "\t")):
        path = tmp_path / name
        header = delimiter.join(["instruction", "input", "output"])
        rows = [delimiter.join([r["instruction"], f'"{r.get("input", "")}"', r["output"]]) for r in RECORDS]
        path.write_text("\n".join([header, *rows]) + "\n")
        examples = load_examples(path).examples
        _check_alpaca_examples(examples)
        assert [e.origin.number for e in examples] == [2, 3, 4]  # line 1 is the header


def test_csv_row_spanning_lines_reports_its_first_line(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text('prompt,completion\n"line one\nline two",a\nq,b\n')
    examples = load_examples(path).examples
    assert examples[0].messages[0].content == "line one\nline two"
    assert [e.origin.number for e in examples] == [2, 4]


def test_csv_cell_holding_a_json_conversation(tmp_path):
    path = tmp_path / "chat.csv"
    conversation = json.dumps([{"role": "user", "content": "Hi, you"}, {"role": "assistant", "content": "Hello"}])
    path.write_text("messages\n" + '"' + conversation.replace('"', '""') + '"\n')
    (example,) = load_examples(path).examples
    assert example.messages == (Message("user", "Hi, you"), Message("assistant", "Hello"))


def test_parquet(tmp_path):
    pyarrow = pytest.importorskip("pyarrow")
    import pyarrow.parquet as parquet

    path = tmp_path / "data.parquet"
    table = pyarrow.table({"messages": [[{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}] for i in range(3)]})
    parquet.write_table(table, path)
    examples = load_examples(path).examples
    assert [e.messages[1].content for e in examples] == ["a0", "a1", "a2"]
    assert [str(e.origin) for e in examples] == [f"{path} row {i}" for i in (1, 2, 3)]


def test_parquet_without_pyarrow_names_the_pip_command(tmp_path, monkeypatch):
    path = tmp_path / "data.parquet"
    path.write_bytes(b"PAR1")
    real_import = builtins.__import__

    def import_without_pyarrow(name, *args, **kwargs):
        if name.startswith("pyarrow"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", import_without_pyarrow)
    with pytest.raises(MissingPackageError, match="pip install pyarrow"):
        load_examples(path)


def test_folder_is_read_recursively_in_sorted_order_with_per_file_formats(tmp_path, write_jsonl):
    write_jsonl([{"text": "from b"}], "b.jsonl")
    write_jsonl([{"prompt": "p", "completion": "from a"}], "a.jsonl")
    write_jsonl([{"text": "from sub"}], "sub/c.jsonl")
    write_jsonl([{"text": "hidden"}], ".hidden/d.jsonl")
    (tmp_path / "notes.txt").write_text("not data")
    examples = load_examples(tmp_path).examples
    contents = [e.text if e.text is not None else e.messages[-1].content for e in examples]
    assert contents == ["from a", "from b", "from sub"]


def test_folder_without_data_files(tmp_path):
    (tmp_path / "readme.md").write_text("x")
    with pytest.raises(DataError, match="holds no data files"):
        load_examples(tmp_path)


def test_unsupported_extension(tmp_path):
    path = tmp_path / "data.txt"
    path.write_text("hello")
    with pytest.raises(DataError, match=r"unsupported extension '\.txt'.*\.jsonl"):
        load_examples(path)


def test_unknown_source_lists_bundled_datasets(tmp_path):
    with pytest.raises(DataError, match="arithmetic.*chatterbot.*state_tracking"):
        load_examples(tmp_path / "missing.jsonl")


def test_bundled_dataset_by_name_with_options():
    examples = load_examples("arithmetic", split="eval", size=5, seed=1).examples
    assert len(examples) == 5 and all(e.answer for e in examples)


def test_dataset_options_on_a_file_are_rejected(write_jsonl):
    with pytest.raises(Exception, match=r"\['size'\] apply only to bundled datasets"):
        load_examples(write_jsonl(RECORDS), size=3)
