"""``joint``: multi-task training on every task at once, the usual upper bound of a continual stream
(multi-task learning, the "MTL" reference row of continual-learning papers such as O-LoRA). One stage, one
adapter, the union of all tasks' training data shuffled together; R has one row.

Budget: the stage trains ``training.max_steps`` times the number of tasks, the total budget the
sequential methods spend over the stream."""

from __future__ import annotations

from tuneforge.continual.methods.base import ContinualMethod, Stage


class Joint(ContinualMethod):
    name = "joint"

    def stage_tasks(self) -> list[tuple[int, ...]]:
        return [tuple(range(len(self.context.tasks)))]

    def init_adapter(self, stage: Stage):
        return None
