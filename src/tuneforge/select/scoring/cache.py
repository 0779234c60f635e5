"""Scores cached on disk per (model, data): a second selection over the same data and model is free.

The key hashes the model's identity (its name and a fingerprint of its first weights, so two
different checkpoints under one name never share scores) with the exact token sequences scored.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Callable
from pathlib import Path

import numpy as np

from tuneforge.fileio import atomic_write


def default_cache_dir() -> Path:
    return Path.home() / ".cache" / "tuneforge" / "select"


class ScoreCache:
    def __init__(self, directory: Path | None):
        self.directory = Path(directory).expanduser() if directory is not None else None
        self.hits = 0

    def get_or_compute(self, key: str, compute: Callable[[], np.ndarray]) -> np.ndarray:
        if self.directory is None:
            return compute()
        path = self.directory / f"{key}.npy"
        if path.exists():
            self.hits += 1
            return np.load(path, allow_pickle=False)
        values = np.asarray(compute())
        buffer = io.BytesIO()
        np.save(buffer, values, allow_pickle=False)
        atomic_write(path, lambda tmp: tmp.write_bytes(buffer.getvalue()))
        return values


def cache_key(*parts: str | bytes) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part if isinstance(part, bytes) else part.encode())
        digest.update(b"\x00")
    return digest.hexdigest()[:32]


def sequences_digest(sequences) -> bytes:
    """A digest of scored sequences: (token id array, answer length) pairs."""
    digest = hashlib.sha256()
    for ids, answer_len in sequences:
        digest.update(np.asarray(ids, dtype=np.int32).tobytes())
        digest.update(b"|%d;" % answer_len)
    return digest.digest()
