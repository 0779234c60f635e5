"""The co-serving policy on a fake clock: how long a fine-tuning job leaves the engine to decoding.

The oracle is the definition of the share s: over a training step of t seconds and the wait after
it, training holds t / (t + wait) = s of the time whenever requests are waiting or running; an idle
engine costs the job nothing; in SLO mode the job waits while the queue is deeper than the bound.
"""

from __future__ import annotations

import threading

import pytest

from tuneforge.errors import ConfigError
from tuneforge.serve.finetune.coserve import CoservePolicy, TrainingTurns


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def run_one_step(policy, loads, step_seconds: float, clock: FakeClock | None = None):
    """Take the lock, 'train' for step_seconds, then hand over; returns (seconds waited, load polls)."""
    clock = clock or FakeClock()
    polls = []

    def load():
        polls.append(clock.now)
        return loads(clock.now)

    events = []
    turns = TrainingTurns(threading.RLock(), policy, load, clock=clock, wait=clock.sleep,
                          on_release=lambda: events.append("serve"), on_acquire=lambda: events.append("train"))
    turns.enter()
    clock.now += step_seconds
    before = clock.now
    turns.between_steps()
    turns.leave()
    assert events == ["train", "serve", "train", "serve"]
    return clock.now - before, polls


@pytest.mark.parametrize("share", [0.25, 0.5, 0.8, 1.0])
def test_a_busy_engine_gets_the_rest_of_the_time(share):
    step = 0.2
    waited, _ = run_one_step(CoservePolicy(share=share), lambda now: (1, 2), step)
    assert step / (step + waited) == pytest.approx(share, abs=0.01)


def test_an_idle_engine_costs_the_job_nothing():
    waited, polls = run_one_step(CoservePolicy(share=0.1), lambda now: (0, 0), 0.5)
    assert waited == 0 and len(polls) == 1


def test_slo_mode_yields_while_the_queue_is_deep_even_past_its_share():
    # A deep queue (5 > bound 2) until t = 3 s, then drained: the job waits until then, far past
    # the 0.2 s its share alone would give decoding.
    policy = CoservePolicy(share=0.5, slo_queue_depth=2)
    waited, _ = run_one_step(policy, lambda now: (5, 8) if now < 3.0 else (0, 1), 0.2)
    assert 3.0 - 0.2 <= waited <= 3.0 - 0.2 + 0.01
    without_slo, _ = run_one_step(CoservePolicy(share=0.5), lambda now: (5, 8) if now < 3.0 else (0, 1), 0.2)
    assert without_slo == pytest.approx(0.2, abs=0.01)


def test_a_cancelled_job_stops_waiting():
    clock = FakeClock()
    turns = TrainingTurns(threading.RLock(), CoservePolicy(share=0.01), lambda: (1, 1), clock=clock, wait=clock.sleep,
                          should_stop=lambda: clock.now > 0.5)
    turns.enter()
    clock.now += 1.0  # owes 99 s to decoding
    turns.between_steps()
    assert clock.now < 1.6
    turns.leave()


def test_the_lock_is_free_while_the_job_waits():
    lock = threading.Lock()
    seen = []
    clock = FakeClock()

    def wait(seconds):
        seen.append(lock.acquire(blocking=False))  # decoding could take it now
        lock.release()
        clock.sleep(seconds)

    turns = TrainingTurns(lock, CoservePolicy(share=0.5), lambda: (1, 1), clock=clock, wait=wait)
    turns.enter()
    assert not lock.acquire(blocking=False)  # held for the step
    clock.now += 0.05
    turns.between_steps()
    assert seen and all(seen)
    turns.leave()
    assert lock.acquire(blocking=False)


@pytest.mark.parametrize("share, slo", [(0, None), (1.5, None), (-0.1, None), (0.5, -1)])
def test_bad_settings_are_refused(share, slo):
    with pytest.raises(ConfigError, match="finetune"):
        CoservePolicy(share=share, slo_queue_depth=slo)
