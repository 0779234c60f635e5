"""``replay``: experience replay from a reservoir-sampled buffer of earlier tasks' training examples.

    method: {name: replay, fraction: 0.1}

The buffer is filled by reservoir sampling (Vitter 1985, "Random sampling with a reservoir",
Algorithm R): the n-th example seen (0-based) enters while n < K, else replaces slot j when a uniform
draw j in [0, n] falls below K. So after any number of examples every one seen is in the buffer
with the same probability K/n, whichever task it came from, as in tiny episodic memories
(Chaudhry et al. 2019, "On Tiny Episodic Memories in Continual Learning", reservoir sampling).
The capacity K is ``fraction`` of all earlier tasks' training examples at the last task:
K = ceil(fraction * Σ_{i<T-1} n_i). Each task trains on its own examples plus the buffer (one
adapter carried from task to task, as in sequential finetuning). The buffer is a pure function of
the seed and the data, so a resumed stream rebuilds the same one.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

from pydantic import BaseModel, ConfigDict, Field

from tuneforge.continual.methods.base import ContinualMethod, Stage
from tuneforge.data import Example


class ReplayOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    fraction: float = Field(0.1, gt=0, le=1, description="buffer capacity as a fraction of the earlier tasks' examples")


def reservoir_sample(stream: Sequence, capacity: int, rng: random.Random) -> list:
    """Algorithm R: a uniform sample of ``capacity`` items of ``stream`` (all of them when fewer)."""
    buffer: list = []
    for seen, item in enumerate(stream):
        if seen < capacity:
            buffer.append(item)
            continue
        slot = rng.randint(0, seen)  # inclusive: item `seen` is the (seen+1)-th
        if slot < capacity:
            buffer[slot] = item
    return buffer


class Replay(ContinualMethod):
    name = "replay"
    options_class = ReplayOptions

    def capacity(self) -> int:
        earlier = sum(len(task.train) for task in self.context.tasks[:-1])
        return math.ceil(self.options.fraction * earlier)

    def buffer_before(self, task_index: int) -> list[Example]:
        """The buffer after reading tasks 0..task_index-1 in order."""
        seen = [example for task in self.context.tasks[:task_index] for example in task.train]
        return reservoir_sample(seen, self.capacity(), random.Random(f"replay:{self.context.seed}"))

    def training_examples(self, stage: Stage) -> list[Example]:
        (task_index,) = stage.tasks
        return [*self.context.tasks[task_index].train, *self.buffer_before(task_index)]
