"""``merge``: train one LoRA per task from the base, and after each task serve the merge of all the
task LoRAs so far (one model, no task selector), using merge/methods.py on each layer's task vector
ΔW_k = s · B_k A_k:

    method: {name: merge, merge_method: ties, density: 0.5, weight: 1.0}

- ``task_arithmetic`` (Ilharco et al. 2023, "Editing Models with Task Arithmetic"): W + λ Σ_k ΔW_k,
  λ = ``weight``;
- ``ties`` (Yadav et al. 2023, "TIES-Merging", steps trim / elect sign / disjoint merge):
  each ΔW_k keeps its top ``density`` magnitudes, the per-entry sign is elected from the trimmed sum,
  and the entries agreeing with it are averaged, scaled by ``weight``.
Training a task never touches the others' LoRAs; what the merge loses is the interference between
task vectors.
"""

from __future__ import annotations

import contextlib
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from tuneforge.continual.methods.base import ContinualMethod, Stage
from tuneforge.continual.methods.lora_layers import require_lora
from tuneforge.errors import AdapterError
from tuneforge.merge.loras import read_lora
from tuneforge.merge.methods import task_arithmetic, ties


class MergeOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    merge_method: Literal["task_arithmetic", "ties"] = Field("ties", description="how the task LoRAs combine")
    density: float = Field(0.5, gt=0, le=1, description="ties: fraction of each task vector kept")
    weight: float = Field(1.0, gt=0, description="λ: the scale of every task vector")


def merged_deltas(adapter_dirs, method: str, density: float, weight: float) -> dict[str, torch.Tensor]:
    """Module path -> merged ΔW (out, in) over the LoRAs in ``adapter_dirs``."""
    adapters = [read_lora(directory) for directory in adapter_dirs]
    merged = {}
    for name in adapters[0].modules:
        deltas = [adapter.modules[name].delta() for adapter in adapters]
        weights = [weight] * len(deltas)
        merged[name] = task_arithmetic(deltas, weights) if method == "task_arithmetic" else ties(deltas, weights, density)
        if adapters[0].fan_in_fan_out:
            merged[name] = merged[name].T
    return merged


def add_deltas(model: nn.Module, deltas: dict[str, torch.Tensor]) -> nn.Module:
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name, delta in deltas.items():
            if name not in modules:
                raise AdapterError(f"merged LoRA names module {name!r}, which the base model does not have")
            weight = modules[name].weight
            weight.add_(delta.to(weight))
    return model


class Merge(ContinualMethod):
    name = "merge"
    options_class = MergeOptions

    def __init__(self, options, context):
        require_lora(context.train_config, self.name)
        super().__init__(options, context)

    def init_adapter(self, stage: Stage):
        return None  # every task LoRA starts from the base

    @contextlib.contextmanager
    def evaluation_model(self, stage: Stage, model: nn.Module, tokenizer):
        directories = [done.adapter_dir for done in [*self.finished, stage]]
        options = self.options
        yield add_deltas(self.context.fresh_base(), merged_deltas(directories, options.merge_method, options.density,
                                                                  options.weight))
