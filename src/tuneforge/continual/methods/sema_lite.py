"""``sema_lite``: a *simplified* SEMA (Wang et al. 2024, "Self-Expansion of Pre-trained Models with
Mixture of Adapters for Continual Learning", arXiv:2403.18886): add a new adapter only when a
distribution-shift detector fires, else keep training the adapter the new task resembles.

    method: {name: sema_lite, z_threshold: 3.0, centroid_examples: 64}

SEMA attaches, per layer, "representation descriptors" (small autoencoders) to its adapters; a new
task whose reconstruction error is an outlier (a z-score above a threshold) for every descriptor
triggers expansion, and a learned router mixes the adapters. Simplified here, and so named:
- one descriptor per adapter, at the model level: the centroid of its tasks' prompt embeddings under
  the base model and the mean and standard deviation of their distances to it;
- the detector's z-score for a new task against descriptor k is
  (mean distance of the task's embeddings to centroid k - mean_k) / std_k; a shift is detected when
  every z exceeds ``z_threshold`` -> a new adapter is trained from the base; otherwise the nearest
  adapter (lowest z) continues training on the task and its descriptor absorbs the new embeddings;
- routing is nearest-centroid, top-1 (routing.py), not a learned soft mixture; expansion happens per
  task, not per layer.
"""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from tuneforge.continual.methods.base import Stage
from tuneforge.continual.methods.task_adapters import RoutedAdapters


class SemaLiteOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    z_threshold: float = Field(3.0, gt=0, description="expand when the new task's z-score exceeds this for every adapter")
    centroid_examples: int = Field(64, ge=2, description="training prompts per task in the descriptors")


def shift_scores(embeddings: torch.Tensor, descriptors: list[dict]) -> torch.Tensor:
    """(adapters,) z-score of the mean distance of ``embeddings`` (N, H) to each descriptor's centroid."""
    scores = []
    for descriptor in descriptors:
        distance = (embeddings - descriptor["centroid"]).norm(dim=-1).mean()
        scores.append((distance - descriptor["mean"]) / descriptor["std"].clamp_min(1e-6))
    return torch.stack(scores)


def describe(embeddings: torch.Tensor) -> dict:
    centroid = embeddings.mean(0)
    distances = (embeddings - centroid).norm(dim=-1)
    return {"centroid": centroid, "mean": distances.mean(), "std": distances.std(), "embeddings": embeddings}


class SemaLite(RoutedAdapters):
    name = "sema_lite"
    options_class = SemaLiteOptions

    def __init__(self, options, context):
        super().__init__(options, context)
        self.descriptors: list[dict] = []
        self.slot_of_stage: dict[int, int] = {}  # stage index -> adapter slot it trained
        self.expansions: list[bool] = []

    def training_model(self, stage: Stage, base: nn.Module) -> nn.Module:
        (task_index,) = stage.tasks
        if stage.index not in self.slot_of_stage:
            self.slot_of_stage[stage.index] = self._choose_slot(self.task_embeddings(base, task_index))
        return base

    def _choose_slot(self, embeddings: torch.Tensor) -> int:
        if not self.descriptors:
            return 0
        scores = shift_scores(embeddings, self.descriptors)
        if bool((scores > self.options.z_threshold).all()):
            return len(self.descriptors)  # shift detected: a new adapter
        return int(scores.argmin())

    def init_adapter(self, stage: Stage):
        slot = self.slot_of_stage[stage.index]
        if slot < len(self.adapter_stages):  # continue the chosen adapter from its latest version
            latest = self.adapter_stages[slot]
            return next(done.adapter_dir for done in self.finished if done.index == latest)
        return None

    def after_task(self, stage: Stage, model: nn.Module, tokenizer) -> None:
        (task_index,) = stage.tasks
        slot = self.slot_of_stage[stage.index]
        embeddings = self.task_embeddings(model, task_index)
        expanded = slot == len(self.descriptors)
        self.expansions.append(expanded)
        if expanded:
            self.descriptors.append(describe(embeddings))
            self.adapter_stages.append(stage.index)
            self.centroids.append(self.descriptors[-1]["centroid"])
        else:
            self.descriptors[slot] = describe(torch.cat([self.descriptors[slot]["embeddings"], embeddings]))
            self.adapter_stages[slot] = stage.index
            self.centroids[slot] = self.descriptors[slot]["centroid"]

    def state_dict(self) -> dict:
        return {**super().state_dict(), "descriptors": self.descriptors,
                "expansions": torch.tensor(self.expansions, dtype=torch.bool)}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.descriptors = list(state.get("descriptors", []))
        self.expansions = [bool(x) for x in state.get("expansions", torch.zeros(0, dtype=torch.bool)).tolist()]
