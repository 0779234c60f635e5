"""Co-serving: a fine-tuning job's optimizer steps take turns with the engine's decoding steps.

FlexLLM (Oliaro et al., 2024, arXiv:2402.18789) co-serves inference and PEFT finetuning on one copy
of the base weights, giving finetuning the step time inference does not need. Here the two share
the engine's step lock (`Engine.lock`, the adapter manager's model lock): the job holds it for one
optimizer step, then lets go, and `CoservePolicy` says how long decoding gets before the next step.

    share s in (0, 1]: while inference has work, training may use a fraction s of wall time. After a
        training step of t seconds the job waits t (1 - s) / s seconds, so t / (t + t (1 - s) / s) = s.
        With no request waiting or running it does not wait at all.
    SLO mode (slo_queue_depth q): while more than q requests wait in the queue, the job yields
        whatever its share, until the queue is back to q or fewer.

The policy is pure (it sees durations and queue depths, never a clock), so it is tested with a fake
clock; `TrainingTurns` applies it around the lock.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from tuneforge.errors import ConfigError

POLL_SECONDS = 0.005


@dataclass(frozen=True)
class CoservePolicy:
    share: float = 0.5
    slo_queue_depth: int | None = None  # None: no SLO mode

    def __post_init__(self):
        if not 0 < self.share <= 1:
            raise ConfigError(f"--finetune-share {self.share} must be in (0, 1]: the fraction of step time "
                              "a fine-tuning job may take while requests are served")
        if self.slo_queue_depth is not None and self.slo_queue_depth < 0:
            raise ConfigError(f"--finetune-slo-queue {self.slo_queue_depth} must be >= 0")

    def owed_to_inference(self, step_seconds: float) -> float:
        """Seconds decoding gets after a training step of `step_seconds`."""
        return step_seconds * (1 - self.share) / self.share

    def may_train(self, waited: float, owed: float, queue_depth: int, running: int) -> bool:
        """Whether the job may take its next step, having waited `waited` of the `owed` seconds."""
        if self.slo_queue_depth is not None and queue_depth > self.slo_queue_depth:
            return False
        if queue_depth == 0 and running == 0:
            return True  # nothing to serve: an idle engine gives its time away
        return waited >= owed


class TrainingTurns:
    """Hold `lock` during training steps and hand it to decoding in between, as `policy` says.

    `enter()` takes the lock for the job's setup and first step; `between_steps()` (called from the
    training loop's `on_step`) releases it, waits, and takes it back; `leave()` releases it for good.
    `on_release` / `on_acquire` switch the shared model between serving and training (eval/train mode,
    the job's adapter off/on) while the lock is held, so a decoding step never sees training state.
    `yield_requested` is set while the job waits for the lock, so the engine's loop steps aside."""

    def __init__(self, lock, policy: CoservePolicy, load: Callable[[], tuple[int, int]], *,
                 on_release: Callable[[], None] = lambda: None, on_acquire: Callable[[], None] = lambda: None,
                 clock: Callable[[], float] = time.monotonic, wait: Callable[[float], None] = time.sleep,
                 should_stop: Callable[[], bool] = lambda: False, yield_requested: threading.Event | None = None):
        self.lock, self.policy, self.load = lock, policy, load
        self.on_release, self.on_acquire = on_release, on_acquire
        self.clock, self.wait, self.should_stop = clock, wait, should_stop
        self.yield_requested = yield_requested if yield_requested is not None else threading.Event()
        self.held = False
        self._step_started = 0.0
        self.waited_total = 0.0  # seconds the job gave to decoding (for events and benchmarks)

    def enter(self) -> None:
        self._acquire()

    def between_steps(self) -> None:
        owed = self.policy.owed_to_inference(self.clock() - self._step_started)
        self._release()
        started = self.clock()
        while not self.should_stop() and not self.policy.may_train(self.clock() - started, owed, *self.load()):
            self.wait(POLL_SECONDS)
        self.waited_total += self.clock() - started
        self._acquire()

    def leave(self) -> None:
        if self.held:
            self._release()

    def _acquire(self) -> None:
        self.yield_requested.set()
        try:
            self.lock.acquire()
        finally:
            self.yield_requested.clear()
        self.held = True
        self.on_acquire()
        self._step_started = self.clock()

    def _release(self) -> None:
        try:
            self.on_release()
        finally:
            self.held = False
            self.lock.release()
