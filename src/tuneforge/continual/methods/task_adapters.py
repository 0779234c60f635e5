"""``task_adapters``: one adapter per task and a nearest-centroid task selector, in the style of
ConPET's dynamic version (Song et al. 2023, "ConPET: Continual Parameter-Efficient Tuning for Large
Language Models", arXiv:2309.14763, "Dynamic ConPET": task-specific PET modules plus a selector
that picks the module(s) for each input).

    method: {name: task_adapters, centroid_examples: 64}

Each task trains a fresh adapter from the base, so training a later task cannot change an earlier
task's adapter at all. ConPET learns its selector; here the selector is the simplest one it is
compared with, nearest class mean (Rebuffi et al. 2017, iCaRL, "nearest-mean-of-exemplars" classification):
each adapter keeps the centroid of its task's prompt embeddings under the base model, and every
input goes to the adapter whose centroid is most cosine-similar (routing.py). Forgetting can then
only come from the selector sending an old task's input to the wrong adapter.
"""

from __future__ import annotations

import contextlib

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from tuneforge.adapters.peft_format import load_adapter
from tuneforge.continual.methods.base import ContinualMethod, Stage
from tuneforge.continual.methods.routing import prompt_embeddings, routed


class TaskAdapterOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    centroid_examples: int = Field(64, ge=1, description="training prompts averaged into each task's centroid")


class RoutedAdapters(ContinualMethod):
    """Shared by the per-task-adapter methods: adapters trained from the base, routed by centroid.

    ``self.adapters`` lists, per adapter, the stage whose saved adapter is its latest version; and
    ``self.centroids`` its centroid (H,)."""

    def __init__(self, options, context):
        super().__init__(options, context)
        self.adapter_stages: list[int] = []
        self.centroids: list[torch.Tensor] = []

    def init_adapter(self, stage: Stage):
        return None

    def task_embeddings(self, model: nn.Module, task_index: int) -> torch.Tensor:
        return prompt_embeddings(model, self.context.tokenizer, self.context.tasks[task_index].train,
                                 self.context.train_config, self.options.centroid_examples)

    @contextlib.contextmanager
    def evaluation_model(self, stage: Stage, model: nn.Module, tokenizer):
        stages = {done.index: done for done in [*self.finished, stage]}
        evaluated = self.context.fresh_base()
        names = []
        for slot, stage_index in enumerate(self.adapter_stages):
            names.append(f"task-adapter-{slot}")
            load_adapter(evaluated, stages[stage_index].adapter_dir, names[-1])
        with routed(evaluated, names, torch.stack(self.centroids)) as routed_model:
            yield routed_model

    def state_dict(self) -> dict:
        return {"adapter_stages": torch.tensor(self.adapter_stages, dtype=torch.long), "centroids": list(self.centroids)}

    def load_state_dict(self, state: dict) -> None:
        self.adapter_stages = [int(i) for i in state.get("adapter_stages", torch.zeros(0, dtype=torch.long)).tolist()]
        self.centroids = list(state.get("centroids", []))


class TaskAdapters(RoutedAdapters):
    name = "task_adapters"
    options_class = TaskAdapterOptions

    def after_task(self, stage: Stage, model: nn.Module, tokenizer) -> None:
        (task_index,) = stage.tasks
        self.adapter_stages.append(stage.index)
        self.centroids.append(self.task_embeddings(model, task_index).mean(0))
