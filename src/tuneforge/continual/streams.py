"""Bundled task streams: fixed sequences of tasks with checkable answers, all generated offline.

    stream: synthetic4      # date_format -> unit_conversion -> string_reversal -> json_extraction
    stream: mixed4          # arithmetic -> state_tracking -> string_reversal -> date_format

Each task is a bundled dataset whose train/eval split is a pure function of the problem (see
data/datasets/splits.py), so every run of a stream trains and evaluates on the same examples.
"""

from __future__ import annotations

from tuneforge.errors import ConfigError

STREAMS: dict[str, tuple[str, ...]] = {
    "synthetic4": ("date_format", "unit_conversion", "string_reversal", "json_extraction"),
    "mixed4": ("arithmetic", "state_tracking", "string_reversal", "date_format"),
}


def stream_tasks(name: str) -> tuple[str, ...]:
    """The dataset names of bundled stream ``name``, in training order."""
    if name not in STREAMS:
        raise ConfigError(f"stream={name!r} is not a bundled stream; available: "
                          + ", ".join(f"{key} ({' -> '.join(tasks)})" for key, tasks in STREAMS.items()))
    return STREAMS[name]
