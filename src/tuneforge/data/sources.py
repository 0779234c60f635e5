"""Reading raw records from local files and folders, each tagged with its file and line.

A reader yields `RawRecord`s: the parsed value plus its origin, or, for a line that could not be
parsed (invalid JSON, bytes that are not UTF-8), the problem instead of a value, so that the loader
can apply `on_bad_record` to it like to any other bad record. Problems that make a whole file
unreadable (a .json document that does not parse) raise `DataError` at once: there is no single
record to skip.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tuneforge.data.records import Origin
from tuneforge.errors import DataError, MissingPackageError

JSONL_SUFFIXES = (".jsonl", ".ndjson")
SUPPORTED_SUFFIXES = (*JSONL_SUFFIXES, ".json", ".csv", ".tsv", ".parquet")


@dataclass(frozen=True)
class RawRecord:
    """One record as read from disk. Exactly one of `value` (parsed) or `problem` (why it could not
    be parsed) is meaningful; `problem` is None for a readable record."""

    value: Any
    origin: Origin
    problem: str | None = None


def data_files(path: Path) -> list[Path]:
    """The data files a source path stands for: the file itself, or every supported file under a
    folder (recursively, hidden files skipped), sorted by relative path so the order, and so the
    shuffles seeded from it, is the same on every machine."""
    if path.is_file():
        _check_suffix(path)
        return [path]
    if not path.is_dir():
        raise DataError(f"Data source {str(path)!r} does not exist. Give a file ({', '.join(SUPPORTED_SUFFIXES)}), a folder of such files, or a bundled dataset name.")
    found = [
        file
        for file in path.rglob("*")
        if file.is_file() and file.suffix.lower() in SUPPORTED_SUFFIXES and not _is_hidden(file.relative_to(path))
    ]
    if not found:
        raise DataError(f"Data folder {str(path)!r} holds no data files; expected files ending in {', '.join(SUPPORTED_SUFFIXES)}.")
    return sorted(found, key=lambda file: file.relative_to(path).as_posix())


def read_records(path: Path) -> Iterator[RawRecord]:
    """Every record of one data file, in file order."""
    suffix = _check_suffix(path)
    if suffix in JSONL_SUFFIXES:
        return _read_jsonl(path)
    if suffix == ".json":
        return _read_json(path)
    if suffix in (".csv", ".tsv"):
        return _read_csv(path, delimiter="\t" if suffix == ".tsv" else ",")
    return _read_parquet(path)


def _check_suffix(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix not in SUPPORTED_SUFFIXES:
        raise DataError(f"Data file {str(path)!r} has the unsupported extension {suffix!r}; supported: {', '.join(SUPPORTED_SUFFIXES)}.")
    return suffix


def _is_hidden(relative: Path) -> bool:
    return any(part.startswith(".") for part in relative.parts)


def _read_jsonl(path: Path) -> Iterator[RawRecord]:
    # Lines are decoded one at a time so that one bad line is reported (or skipped) on its own
    # instead of making the whole file unreadable.
    for line_number, raw_line in enumerate(path.read_bytes().split(b"\n"), start=1):
        origin = Origin(str(path), line_number)
        if line_number == 1:
            raw_line = raw_line.removeprefix(b"\xef\xbb\xbf")  # UTF-8 byte-order mark
        try:
            line = raw_line.decode("utf-8")
        except UnicodeDecodeError as error:
            yield RawRecord(None, origin, f"the line is not valid UTF-8 (byte {raw_line[error.start]:#04x} at column {error.start + 1}); re-encode the file as UTF-8")
            continue
        if not line.strip():
            continue
        try:
            yield RawRecord(json.loads(line), origin)
        except json.JSONDecodeError as error:
            yield RawRecord(None, origin, f"invalid JSON ({error.msg} at column {error.colno}); each line of a .jsonl file must be one JSON object")


def _read_json(path: Path) -> Iterator[RawRecord]:
    text = _decode_whole_file(path)
    try:
        document = json.loads(text)
    except json.JSONDecodeError as error:
        raise DataError(
            f"{path}:{error.lineno}: invalid JSON ({error.msg} at column {error.colno}); a .json data file "
            "must be one JSON document: a list of records or {\"data\": [...]}."
        ) from None
    if isinstance(document, list):
        records, array_start = document, _skip_whitespace(text, 0)
    elif isinstance(document, dict) and isinstance(document.get("data"), list):
        records, array_start = document["data"], _offset_of_data_array(text)
    else:
        shape = f"an object with keys {sorted(document)}" if isinstance(document, dict) else type(document).__name__
        raise DataError(f"{path}: expected a list of records or an object {{\"data\": [records]}}, found {shape}.")
    line_number, counted_up_to = 1, 0
    for record, offset in zip(records, _array_item_offsets(text, array_start)):
        line_number += text.count("\n", counted_up_to, offset)
        counted_up_to = offset
        yield RawRecord(record, Origin(str(path), line_number))


def _decode_whole_file(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line_number = data.count(b"\n", 0, error.start) + 1
        raise DataError(f"{path}:{line_number}: the file is not valid UTF-8 (byte {data[error.start]:#04x}); re-encode it as UTF-8.") from None


def _skip_whitespace(text: str, position: int) -> int:
    while position < len(text) and text[position] in " \t\r\n":
        position += 1
    return position


def _array_item_offsets(text: str, array_start: int) -> Iterator[int]:
    """Character offsets where each item of the JSON array starting at `array_start` begins.

    The document has already been parsed successfully, so this walk needs no error handling; it
    exists only to turn record positions into line numbers for error messages."""
    decoder = json.JSONDecoder()
    position = array_start + 1  # past "["
    while True:
        position = _skip_whitespace(text, position)
        if text[position] == "]":
            return
        yield position
        _, position = decoder.raw_decode(text, position)
        position = _skip_whitespace(text, position)
        if text[position] == ",":
            position += 1


def _offset_of_data_array(text: str) -> int:
    """Offset of the value of the top-level key "data" (the last one, as json.loads keeps)."""
    decoder = json.JSONDecoder()
    position = _skip_whitespace(text, 0) + 1  # past "{"
    found = -1
    while True:
        position = _skip_whitespace(text, position)
        if text[position] == "}":
            return found
        key, position = decoder.raw_decode(text, position)
        position = _skip_whitespace(text, position) + 1  # past ":"
        position = _skip_whitespace(text, position)
        if key == "data":
            found = position
        _, position = decoder.raw_decode(text, position)
        position = _skip_whitespace(text, position)
        if text[position] == ",":
            position += 1


def _read_csv(path: Path, delimiter: str) -> Iterator[RawRecord]:
    # surrogateescape keeps undecodable bytes as lone surrogates, so a bad row is found and
    # reported by its line while the rest of the file stays readable.
    text = path.read_bytes().decode("utf-8", errors="surrogateescape").removeprefix("\ufeff")
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    header = next(reader, None)
    if header is None:
        return
    if any(_has_undecodable_bytes(cell) for cell in header):
        raise DataError(f"{path}:1: the header row is not valid UTF-8; re-encode the file as UTF-8.")
    while True:
        line_number = reader.line_num + 1  # the line this row starts on (rows may span lines)
        row = next(reader, None)
        if row is None:
            return
        origin = Origin(str(path), line_number)
        if not any(cell.strip() for cell in row):
            continue
        if any(_has_undecodable_bytes(cell) for cell in row):
            yield RawRecord(None, origin, "the row is not valid UTF-8; re-encode the file as UTF-8")
        elif len(row) != len(header):
            yield RawRecord(None, origin, f"the row has {len(row)} cells but the header has {len(header)} columns {header}")
        else:
            yield RawRecord(dict(zip(header, row)), origin)


def _has_undecodable_bytes(cell: str) -> bool:
    return any("\udc80" <= char <= "\udcff" for char in cell)


def _read_parquet(path: Path) -> Iterator[RawRecord]:
    try:
        import pyarrow.parquet as parquet
    except ImportError:
        raise MissingPackageError("pyarrow", f"Reading the parquet file {path}") from None
    try:
        rows = parquet.read_table(path).to_pylist()
    except Exception as error:  # pyarrow raises several unrelated types for corrupt files
        raise DataError(f"{path}: cannot read the parquet file ({error}).") from None
    for row_number, row in enumerate(rows, start=1):
        yield RawRecord(row, Origin(str(path), row_number, unit="row"))
