"""Continuous batching: who waits, who runs, who leaves.

Requests wait in a bounded FIFO queue (a full queue refuses new work instead of growing without
limit: back-pressure). Before every decoding step the engine asks `admit` for as many waiting
requests as there are free rows; finished rows leave after the step that finished them, so the
batch changes at every step. The scheduler sees request objects, never tensors.
"""

from __future__ import annotations

import threading
from collections import deque
from typing import Generic, TypeVar

from tuneforge.errors import TuneforgeError

Item = TypeVar("Item")


class QueueFullError(TuneforgeError):
    """The waiting queue is at its bound; the client should retry later."""


class Scheduler(Generic[Item]):
    def __init__(self, max_batch_size: int, max_queue: int):
        if max_batch_size < 1 or max_queue < 1:
            raise ValueError(f"max_batch_size={max_batch_size} and max_queue={max_queue} must be >= 1")
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self._waiting: deque[Item] = deque()
        self.running: list[Item] = []
        self._lock = threading.Lock()

    def enqueue(self, item: Item) -> None:
        with self._lock:
            if len(self._waiting) >= self.max_queue:
                raise QueueFullError(
                    f"the request queue is full ({self.max_queue} waiting); retry later or raise --max-queue"
                )
            self._waiting.append(item)

    def admit(self) -> list[Item]:
        """Move waiting requests, oldest first, into the free rows of the running batch."""
        with self._lock:
            free = self.max_batch_size - len(self.running)
            admitted = [self._waiting.popleft() for _ in range(min(free, len(self._waiting)))]
        self.running.extend(admitted)
        return admitted

    def waiting(self) -> list[Item]:
        """A snapshot of the queue, oldest first."""
        with self._lock:
            return list(self._waiting)

    def remove_waiting(self, item: Item) -> bool:
        with self._lock:
            try:
                self._waiting.remove(item)
            except ValueError:
                return False
            return True

    def drain_waiting(self) -> list[Item]:
        with self._lock:
            items = list(self._waiting)
            self._waiting.clear()
        return items

    @property
    def queue_depth(self) -> int:
        return len(self._waiting)

    @property
    def has_work(self) -> bool:
        return bool(self.running) or bool(self._waiting)
