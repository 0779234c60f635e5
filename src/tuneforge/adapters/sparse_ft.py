"""Sparse finetuning with a target density (diff pruning, Guo et al. 2021, magnitude variant).

Each target layer trains a dense ΔW; after the optimizer step every ``project_every`` steps, and
always after the last step, ΔW is projected onto its ``k = round(target_density · numel)``
largest-magnitude entries (the rest set to zero). The file holds only the non-zero entries, as
flat indices into the base weight's own layout plus their values (``sparse_indices``,
``sparse_values``), so a projected adapter is small.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import nn

from tuneforge.adapters.config import AdapterConfig
from tuneforge.adapters.hooks import TrainingHooks
from tuneforge.adapters.layer import LayerAdapter
from tuneforge.adapters.layer_selective import FullDelta
from tuneforge.adapters.lora import is_transposed
from tuneforge.errors import AdapterError


class SparseFTConfig(AdapterConfig):
    """target_density: fraction of each target weight that may differ from the base after training.

    project_every: also project every N optimizer steps (None: only after the last step).
    """

    method: Literal["sparse-ft"] = "sparse-ft"
    target_density: float = Field(0.01, gt=0.0, le=1.0)
    project_every: int | None = Field(None, gt=0)


class SparseDelta(FullDelta):
    """A dense trainable ΔW that is projected to its largest entries; saved as indices + values."""

    def __init__(self, weight_shape: torch.Size, in_out_layout: bool, target_density: float):
        super().__init__(weight_shape, in_out_layout)
        self.keep = max(1, round(target_density * self.delta.numel()))

    @torch.no_grad()
    def project(self) -> None:
        """Zero all but the ``keep`` largest-magnitude entries of ΔW."""
        flat = self.delta.view(-1)
        if int((flat != 0).sum()) <= self.keep:
            return
        kept = flat.abs().topk(self.keep, sorted=False).indices
        values = flat[kept].clone()
        flat.zero_()
        flat[kept] = values

    def file_tensors(self):
        flat = self.delta.detach().view(-1)
        indices = flat.nonzero().view(-1)
        return {"sparse_indices": indices, "sparse_values": flat[indices]}

    def load_file_tensors(self, tensors, where):
        for key in ("sparse_indices", "sparse_values"):
            if key not in tensors:
                raise AdapterError(f"adapter file has no tensor '{where}.{key}'")
        indices, values = tensors["sparse_indices"].long(), tensors["sparse_values"]
        if indices.shape != values.shape or (indices.numel() and int(indices.max()) >= self.delta.numel()):
            raise AdapterError(
                f"tensors '{where}.sparse_indices/sparse_values' do not fit this layer's weight "
                f"{tuple(self.delta.shape)}: the adapter was made for a different base model"
            )
        with torch.no_grad():
            self.delta.zero_()
            self.delta.view(-1)[indices] = values.to(self.delta.dtype)

    def density(self) -> float:
        return float((self.delta != 0).sum()) / self.delta.numel()


def build_sparse_ft(base_layer: nn.Module, config: SparseFTConfig, module_name: str) -> LayerAdapter:
    if isinstance(base_layer, nn.Embedding):
        raise AdapterError(f"sparse-ft: '{module_name}' is an Embedding; target Linear/Conv1D layers")
    return SparseDelta(base_layer.weight.shape, is_transposed(base_layer), config.target_density)


class DensityProjection(TrainingHooks):
    def __init__(self, adapter_name: str, project_every: int | None):
        self.adapter_name = adapter_name
        self.project_every = project_every

    def after_optimizer_step(self, model, step, total_steps):
        periodic = self.project_every is not None and (step + 1) % self.project_every == 0
        if periodic or step + 1 >= total_steps:
            project_adapter(model, self.adapter_name)


def project_adapter(model: nn.Module, adapter_name: str) -> None:
    """Project every layer of a sparse-ft adapter to its target density (also usable by hand)."""
    from tuneforge.adapters.model import wrapped_layers

    for _, layer in wrapped_layers(model):
        adapter = layer.adapters[adapter_name] if adapter_name in layer.adapters else None
        if isinstance(adapter, SparseDelta):
            adapter.project()


def sparse_ft_hooks(model: nn.Module, adapter_name: str, config: SparseFTConfig) -> TrainingHooks:
    return DensityProjection(adapter_name, config.project_every)
