"""SHiRA (Bhardwaj et al. 2024): train a fixed, sparse set of base-weight entries.

Paper: Bhardwaj et al., "Sparse High Rank Adapters", 2024, arXiv:2406.13175; implements the sparse update of
its method section (ΔW nonzero only on a fixed mask of W's entries), with PEFT's file layout.

Each target layer picks ``k`` entries of W once (the mask) and trains one value per entry; ΔW is
zero elsewhere, so an adapter is high-rank yet tiny, and switching adapters touches only k entries.

    k = round(density · out · in)        or, with ``r`` set, k = r · (in + out) (PEFT's LoRA-like sizing)

Masks: ``random`` (seeded per layer), ``magnitude`` (largest |W|), ``gradient`` (largest
accumulated |∂L/∂W| over a few batches, computed by the training hook's ``prepare``; until then the
mask is random). The file holds PEFT's ``shira_indices`` ((2, k) int32 rows/cols in the (out, in)
layout) and ``shira_weight`` ((k,)); files written with ``r`` load in peft and vice versa.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from tuneforge.adapters.config import AdapterConfig
from tuneforge.adapters.hooks import TrainingHooks
from tuneforge.adapters.layer import LayerAdapter
from tuneforge.adapters.lora.lora import is_transposed, refuse_quantized_merge, weight_shape
from tuneforge.errors import AdapterError


class ShiraConfig(AdapterConfig):
    """density: fraction of each target weight's entries that train; r (optional) sizes as PEFT does."""

    method: Literal["shira"] = "shira"
    density: float = Field(0.01, gt=0.0, le=1.0)
    r: int | None = Field(None, gt=0)
    mask_type: Literal["random", "magnitude", "gradient"] = "random"
    random_seed: int | None = None
    init: Literal["zeros", "random"] = "zeros"
    fan_in_fan_out: bool = False  # read from the layer type; kept so PEFT files round-trip silently

    peft_type: ClassVar[str] = "SHIRA"
    peft_field_names: ClassVar[dict[str, str]] = {"init": "init_weights"}

    def to_peft_dict(self) -> dict[str, Any]:
        data = super().to_peft_dict()
        data["init_weights"] = self.init == "zeros"
        return data

    @classmethod
    def normalize_peft_values(cls, data: dict[str, Any]) -> dict[str, Any]:
        if isinstance(data.get("init"), bool):
            data["init"] = "zeros" if data["init"] else "random"
        return data

    def entries_for(self, in_features: int, out_features: int, module_name: str) -> int:
        total = in_features * out_features
        count = self.r * (in_features + out_features) if self.r else max(1, round(self.density * total))
        if count > total:
            raise AdapterError(
                f"shira: r={self.r} asks for {count} trainable entries in '{module_name}', which has only "
                f"{total} ({out_features}x{in_features}); lower r or use density"
            )
        return count


def top_entries(scores: torch.Tensor, count: int) -> torch.Tensor:
    """(2, count) row/col indices of the largest scores, in row-major order (as PEFT's masks are)."""
    flat = torch.topk(scores.flatten(), count, sorted=False).indices.sort().values
    return torch.stack([flat // scores.shape[1], flat % scores.shape[1]])


def layer_seed(config: ShiraConfig, module_name: str) -> int:
    # Each layer its own mask, reproducible from the config alone.
    return ((config.random_seed or 0) * 1_000_003 + zlib.crc32(module_name.encode())) % 2**63


class ShiraLayer(LayerAdapter):
    """k trainable entries of ΔW (stored as indices + values), added to the base output."""

    def __init__(self, in_features: int, out_features: int, indices: torch.Tensor, transposed: bool, init: str):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.transposed = transposed
        self.register_buffer("shira_indices", indices.to(torch.int32))  # (2, k): rows, cols of (out, in)
        count = indices.shape[1]
        self.shira_weight = nn.Parameter(torch.zeros(count) if init == "zeros" else torch.randn(count))

    def set_indices(self, indices: torch.Tensor) -> None:
        self.shira_indices.copy_(indices.to(self.shira_indices.device))

    def sparse_delta(self) -> torch.Tensor:
        """ΔW as a dense (out, in) tensor; one scatter of k values per call."""
        rows, cols = self.shira_indices.long()
        dense = self.shira_weight.new_zeros(self.out_features, self.in_features)
        return dense.index_put((rows, cols), self.shira_weight)

    def transform_output(self, x, out, base_layer):
        return out + F.linear(x.to(self.shira_weight.dtype), self.sparse_delta()).to(out.dtype)

    def delta_weight(self, base_layer) -> torch.Tensor:
        delta = self.sparse_delta()
        return delta.T if self.transposed else delta

    def merge(self, base_layer, safe):
        refuse_quantized_merge(base_layer)
        super().merge(base_layer, safe)

    def file_tensors(self):
        return {"shira_weight": self.shira_weight, "shira_indices": self.shira_indices}


def initial_indices(base_layer: nn.Module, config: ShiraConfig, module_name: str, count: int) -> torch.Tensor:
    in_features, out_features = weight_shape(base_layer)
    if config.mask_type == "magnitude":
        weight = base_layer.weight.detach()
        scores = (weight.T if is_transposed(base_layer) else weight).abs().float()  # (out, in)
    else:  # random; a gradient mask replaces it in prepare
        generator = torch.Generator().manual_seed(layer_seed(config, module_name))
        scores = torch.rand(out_features, in_features, generator=generator)
    return top_entries(scores, count)


def build_shira(base_layer: nn.Module, config: ShiraConfig, module_name: str) -> LayerAdapter:
    if isinstance(base_layer, nn.Embedding):
        raise AdapterError(f"shira: '{module_name}' is an Embedding; SHiRA adapts Linear/Conv1D layers only")
    in_features, out_features = weight_shape(base_layer)
    count = config.entries_for(in_features, out_features, module_name)
    indices = initial_indices(base_layer, config, module_name, count)
    return ShiraLayer(in_features, out_features, indices, is_transposed(base_layer), config.init)


class GradientMask(TrainingHooks):
    """``mask_type: gradient``: keep the entries with the largest |∂L/∂W| summed over the given batches."""

    def __init__(self, adapter_name: str):
        self.adapter_name = adapter_name

    def prepare(self, model, batches, loss_fn):
        from tuneforge.adapters.model import wrapped_layers

        layers = [layer for _, layer in wrapped_layers(model) if self.adapter_name in layer.adapters]
        weights = [layer.base_layer.weight for layer in layers]
        if not all(isinstance(w, nn.Parameter) for w in weights):
            raise AdapterError("shira: mask_type 'gradient' needs full-precision base layers; use 'magnitude' on a quantized model")
        scores = score_by_gradient(model, weights, batches, loss_fn)
        for layer, score in zip(layers, scores):
            adapter = layer.adapters[self.adapter_name]
            out_in = score.T if adapter.transposed else score
            adapter.set_indices(top_entries(out_in, adapter.shira_indices.shape[1]))


def score_by_gradient(model: nn.Module, weights: list[nn.Parameter], batches, loss_fn,
                      reduce: Callable[[torch.Tensor], torch.Tensor] = torch.abs) -> list[torch.Tensor]:
    """Σ over batches of ``reduce(∂L/∂W)`` for each weight (default |∂L/∂W|); the weights are frozen again after."""
    scores: list[torch.Tensor | None] = [None] * len(weights)
    for weight in weights:
        weight.requires_grad_(True)
    try:
        for batch in batches:
            model.zero_grad(set_to_none=True)
            loss_fn(model, batch).backward()
            for index, weight in enumerate(weights):
                term = reduce(weight.grad.detach().float())
                scores[index] = term if scores[index] is None else scores[index] + term
        if any(score is None for score in scores) or not any(bool(score.any()) for score in scores):
            raise AdapterError("gradient-based selection got no batches (or all-zero gradients); pass training batches to prepare")
    finally:
        for weight in weights:
            weight.requires_grad_(False)
        model.zero_grad(set_to_none=True)
    return scores


def shira_hooks(model: nn.Module, adapter_name: str, config: ShiraConfig) -> TrainingHooks | None:
    return GradientMask(adapter_name) if config.mask_type == "gradient" else None
