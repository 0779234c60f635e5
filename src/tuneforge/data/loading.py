"""`load_examples`: one entry point for files, folders and bundled datasets, with the bad-record policy."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from tuneforge.data.datasets import dataset_names, get_dataset
from tuneforge.data.formats import RecordError, check_format_name, convert_record, detect_format
from tuneforge.data.records import Example
from tuneforge.data.sources import SUPPORTED_SUFFIXES, data_files, read_records
from tuneforge.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

BAD_RECORD_POLICIES = ("error", "skip")
# Enough locations to find the pattern (one broken export step, one bad column) without flooding.
SHOWN_PROBLEMS = 5


@dataclass
class LoadResult:
    """The examples read, and how many bad records were skipped (`problems` says where and why)."""

    examples: list[Example]
    skipped: int = 0
    problems: list[str] = field(default_factory=list)


def load_examples(
    source: str | Path,
    format: str | None = None,
    on_bad_record: str = "error",
    split: str = "train",
    **dataset_options,
) -> LoadResult:
    """Read examples from a data file, a folder of data files, or a bundled dataset by name.

    `format` is detected per file from the first records' keys when not given. With
    `on_bad_record="error"` any malformed record raises `DataError` listing the first few
    locations; with `"skip"` they are dropped, counted, and logged once as a warning. `split` and
    `dataset_options` (e.g. `size`, `seed`, `language`) apply to bundled datasets only; a file or
    folder is used whole. An existing path takes precedence over a bundled name.
    """
    if on_bad_record not in BAD_RECORD_POLICIES:
        raise ConfigError(f"on_bad_record={on_bad_record!r} is not one of {list(BAD_RECORD_POLICIES)}")
    path = Path(source)
    if not path.exists() and str(source) in dataset_names():
        if format is not None:
            raise ConfigError(f"format={format!r} was given for the bundled dataset {str(source)!r}, which needs no format; remove it.")
        return LoadResult(get_dataset(str(source), split=split, **dataset_options))
    if not path.exists():
        raise DataError(
            f"Data source {str(source)!r} is neither an existing file or folder nor a bundled dataset. "
            f"Bundled datasets: {', '.join(dataset_names())}; files may end in {', '.join(SUPPORTED_SUFFIXES)}."
        )
    if dataset_options:
        raise ConfigError(f"Options {sorted(dataset_options)} apply only to bundled datasets, but {str(source)!r} is a file or folder; remove them.")
    examples, problems = _read_path(path, format)
    if problems:
        _apply_bad_record_policy(problems, on_bad_record, str(source))
    if not examples:
        raise DataError(f"Data source {str(source)!r} has no usable examples" + (f" ({len(problems)} bad records were skipped)." if problems else "."))
    return LoadResult(examples, skipped=len(problems), problems=problems)


def _read_path(path: Path, format: str | None) -> tuple[list[Example], list[str]]:
    forced_format = check_format_name(format) if format is not None else None
    examples: list[Example] = []
    problems: list[str] = []
    for file in data_files(path):
        records = list(read_records(file))
        # Each file of a folder may have its own format when none is forced.
        record_format = forced_format or detect_format([r.value for r in records if r.problem is None], str(file))
        for record in records:
            if record.problem is not None:
                problems.append(f"{record.origin}: {record.problem}")
                continue
            try:
                examples.append(convert_record(record.value, record_format, record.origin))
            except RecordError as error:
                problems.append(f"{record.origin}: {error} (format {record_format.name!r})")
    return examples, problems


def _apply_bad_record_policy(problems: list[str], on_bad_record: str, source: str) -> None:
    shown = "\n".join(f"  {problem}" for problem in problems[:SHOWN_PROBLEMS])
    more = f"\n  ... and {len(problems) - SHOWN_PROBLEMS} more" if len(problems) > SHOWN_PROBLEMS else ""
    if on_bad_record == "error":
        raise DataError(f"{len(problems)} bad record(s) in {source}:\n{shown}{more}\nFix them, or set on_bad_record='skip' to leave them out.")
    logger.warning("Skipped %d bad record(s) in %s:\n%s%s", len(problems), source, shown, more)
