"""Engine counters and their Prometheus text exposition (format 0.0.4, written by hand: it is tiny).

    # HELP name text
    # TYPE name gauge|counter|histogram
    name{label="value"} number
"""

from __future__ import annotations

import threading
import time
from collections import deque

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
THROUGHPUT_WINDOW_S = 10.0


class Histogram:
    def __init__(self, buckets: tuple[float, ...]):
        self.buckets = buckets
        self.counts = [0] * len(buckets)  # per bucket, not cumulative
        self.total = 0
        self.sum = 0.0

    def observe(self, value: float) -> None:
        for index, bound in enumerate(self.buckets):
            if value <= bound:
                self.counts[index] += 1
                break
        self.total += 1
        self.sum += value

    def cumulative(self) -> list[tuple[str, int]]:
        """(le, count of observations <= le) per bucket, ending with +Inf."""
        rows, running = [], 0
        for bound, count in zip(self.buckets, self.counts):
            running += count
            rows.append((_number(bound), running))
        rows.append(("+Inf", self.total))
        return rows


class EngineStats:
    """What the engine reports: load, generated tokens (total and recent rate), request latency."""

    def __init__(self):
        self._lock = threading.Lock()
        self.queue_depth = 0
        self.running = 0
        self.generated_tokens = 0
        self.finished_requests = 0
        self.latency = Histogram(LATENCY_BUCKETS)
        self._recent: deque[tuple[float, int]] = deque()

    def set_load(self, queue_depth: int, running: int) -> None:
        self.queue_depth, self.running = queue_depth, running

    def add_tokens(self, count: int) -> None:
        now = time.monotonic()
        with self._lock:
            self.generated_tokens += count
            self._recent.append((now, count))
            self._forget_before(now - THROUGHPUT_WINDOW_S)

    def observe_latency(self, seconds: float) -> None:
        with self._lock:
            self.finished_requests += 1
            self.latency.observe(seconds)

    def tokens_per_second(self) -> float:
        now = time.monotonic()
        with self._lock:
            self._forget_before(now - THROUGHPUT_WINDOW_S)
            if not self._recent:
                return 0.0
            span = max(now - self._recent[0][0], 1e-3)
            return sum(count for _, count in self._recent) / span

    def _forget_before(self, cutoff: float) -> None:
        while self._recent and self._recent[0][0] < cutoff:
            self._recent.popleft()


def prometheus_text(stats: EngineStats, adapters_loaded: int) -> str:
    lines: list[str] = []

    def metric(name: str, kind: str, help_text: str, value: float) -> None:
        lines.extend([f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", f"{name} {_number(value)}"])

    metric("tuneforge_queue_depth", "gauge", "Requests waiting to join the running batch.", stats.queue_depth)
    metric("tuneforge_running_batch_size", "gauge", "Requests in the running batch.", stats.running)
    metric("tuneforge_generated_tokens_total", "counter", "Tokens generated since start.", stats.generated_tokens)
    metric("tuneforge_generated_tokens_per_second", "gauge",
           f"Generated tokens per second over the last {THROUGHPUT_WINDOW_S:g} s.", stats.tokens_per_second())
    metric("tuneforge_adapters_loaded", "gauge", "Adapters held in memory.", adapters_loaded)
    name = "tuneforge_request_latency_seconds"
    lines += [f"# HELP {name} Time from submission to the last token.", f"# TYPE {name} histogram"]
    with stats._lock:
        lines += [f'{name}_bucket{{le="{le}"}} {count}' for le, count in stats.latency.cumulative()]
        lines += [f"{name}_sum {_number(stats.latency.sum)}", f"{name}_count {stats.latency.total}"]
    return "\n".join(lines) + "\n"


def _number(value: float) -> str:
    return repr(float(value)) if isinstance(value, float) else str(value)
