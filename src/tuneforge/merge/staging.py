"""Output directories that appear whole or not at all: built in a temp dir beside the target, then renamed."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tuneforge.errors import ConfigError
from tuneforge.merge.loras import _move_into_place


def check_new_output(output_dir: str | Path, overwrite: bool) -> Path:
    output_dir = Path(output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise ConfigError(f"output {str(output_dir)!r} is a file; give a directory path")
    if output_dir.exists() and not overwrite:
        raise ConfigError(f"output {str(output_dir)!r} already exists; pick a new path or pass --overwrite to replace it")
    return output_dir


@contextmanager
def staged_directory(output_dir: str | Path, overwrite: bool) -> Iterator[Path]:
    """Yield an empty staging directory; on success it replaces ``output_dir``, on failure it is removed."""
    output_dir = check_new_output(output_dir, overwrite)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.", suffix=".tmp", dir=output_dir.parent))
    try:
        yield staging
        _move_into_place(staging, output_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
