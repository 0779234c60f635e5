"""Layer-selective finetuning: whole decoder layers train, everything else stays frozen.

Papers: there is no single paper for training whole chosen layers; ``layers``/``top_k`` is the
layer-freezing setting of Lee et al., "What Would Elsa Do? Freezing Layers During Transformer Fine-Tuning",
2019, arXiv:1911.03090, and ``by_importance`` ranks layers by gradient norm in the spirit of the Auto-RGN
criterion of Lee et al., "Surgical Fine-Tuning Improves Adaptation to Distribution Shifts", ICLR 2023,
arXiv:2210.11466, using the plain norm, not the norm relative to the weights. Equation: W' = W + ΔW on every
Linear of a chosen layer, ΔW dense and trainable.

Each linear layer in a chosen decoder layer gets a full-size trainable delta ΔW (zeros at init),
so the base stays untouched and the usual adapter operations (disable, save, delete, merge) keep
working; the file holds only the chosen layers' deltas (``<module>.layer_delta``).

Which layers: ``layers: [..]`` explicitly, ``top_k: N`` (the N layers nearest the output), or
``by_importance: true`` with ``top_k: N`` (the N layers whose base weights have the largest
gradient norm over the first training batches). The last two need the model (and data), so
``add_adapter`` first wraps every layer with an empty placeholder, and the training hook's
``prepare`` replaces the adapter by one with the resolved ``layers`` (which is then what a saved
config records). Outside the training loop, call ``resolve_layer_selection`` yourself.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from tuneforge.adapters.config import AdapterConfig
from tuneforge.adapters.hooks import TrainingHooks
from tuneforge.adapters.layer import LayerAdapter
from tuneforge.adapters.lora.lora import is_transposed, refuse_quantized_merge
from tuneforge.adapters.targeting import DEFAULT_LAYER_PATTERNS, layer_index, linear_layer_types
from tuneforge.errors import AdapterError


class LayerSelectConfig(AdapterConfig):
    """Choose the trainable decoder layers: ``layers``, or ``top_k`` (optionally ``by_importance``)."""

    method: Literal["layer-select"] = "layer-select"
    layers: list[int] | None = None
    top_k: int | None = Field(None, gt=0)
    by_importance: bool = False

    @model_validator(mode="after")
    def _one_way_to_choose(self):
        if (self.layers is None) == (self.top_k is None):
            raise ValueError("give exactly one of layers: [..] or top_k: N (with by_importance: true to rank by gradients)")
        if self.by_importance and self.top_k is None:
            raise ValueError("by_importance: true needs top_k: N, the number of layers to keep")
        if self.layers is not None and self.layers_to_transform != sorted(set(self.layers)):
            self.layers_to_transform = sorted(set(self.layers))  # targeting filters by layer index
        return self

    @property
    def resolved(self) -> bool:
        return self.layers is not None


def apply_weight(x: torch.Tensor, weight: torch.Tensor, in_out_layout: bool) -> torch.Tensor:
    """x W^T for a weight stored (out, in), x W for GPT-2's Conv1D layout (in, out)."""
    return x @ weight if in_out_layout else F.linear(x, weight)


class FullDelta(LayerAdapter):
    """A trainable ΔW of the base weight's own shape and layout; out + ΔW x."""

    leaf = "layer_delta"

    def __init__(self, weight_shape: torch.Size, in_out_layout: bool):
        super().__init__()
        # (in, out) storage as in GPT-2's Conv1D; save_adapter reads an attribute named "transposed" as
        # PEFT's fan_in_fan_out flag, which this non-PEFT format does not have.
        self.in_out_layout = in_out_layout
        self.delta = nn.Parameter(torch.zeros(weight_shape))

    def transform_output(self, x, out, base_layer):
        return out + apply_weight(x.to(self.delta.dtype), self.delta, self.in_out_layout).to(out.dtype)

    def delta_weight(self, base_layer):
        return self.delta

    def merge(self, base_layer, safe):
        refuse_quantized_merge(base_layer)
        super().merge(base_layer, safe)

    def file_tensors(self):
        return {self.leaf: self.delta}


class PendingLayer(LayerAdapter):
    """Stands in until ``prepare`` knows which layers train; changes nothing and stores nothing."""

    def transform_output(self, x, out, base_layer):
        return out

    def merge(self, base_layer, safe):
        pass

    def unmerge(self, base_layer):
        pass

    def file_tensors(self):
        return {}


def build_layer_select(base_layer: nn.Module, config: LayerSelectConfig, module_name: str) -> LayerAdapter:
    if isinstance(base_layer, nn.Embedding):
        raise AdapterError(f"layer-select: '{module_name}' is an Embedding; use modules_to_save for embeddings")
    if not config.resolved:
        return PendingLayer()
    return FullDelta(base_layer.weight.shape, is_transposed(base_layer))


def decoder_layer_indices(model: nn.Module, config: AdapterConfig) -> list[int]:
    patterns = [config.layers_pattern] if isinstance(config.layers_pattern, str) else config.layers_pattern
    patterns = patterns or DEFAULT_LAYER_PATTERNS
    found = {layer_index(name, patterns) for name, _ in model.named_modules()}
    return sorted(i for i in found if i is not None)


def check_layers_exist(model: nn.Module, config: LayerSelectConfig) -> None:
    existing = decoder_layer_indices(model, config)
    missing = [i for i in config.layers or [] if i not in existing]
    if missing:
        valid = f"0..{existing[-1]}" if existing else "none (no numbered decoder layers found)"
        raise AdapterError(f"layer-select: layers {missing} do not exist in {type(model).__name__}; valid layer indices: {valid}")


def layer_importance(model: nn.Module, config: LayerSelectConfig, batches, loss_fn) -> dict[int, float]:
    """Squared gradient norm of each decoder layer's linear weights, summed over the batches."""
    from tuneforge.adapters.selective.shira import score_by_gradient

    patterns = [config.layers_pattern] if isinstance(config.layers_pattern, str) else config.layers_pattern
    patterns = patterns or DEFAULT_LAYER_PATTERNS
    named = [(layer_index(name, patterns), module.weight) for name, module in model.named_modules()
             if isinstance(module, linear_layer_types()) and isinstance(getattr(module, "weight", None), nn.Parameter)]
    named = [(index, weight) for index, weight in named if index is not None]
    squared_norms = score_by_gradient(model, [weight for _, weight in named], batches, loss_fn,
                                      reduce=lambda grad: grad.pow(2).sum())
    importance: dict[int, float] = {}
    for (index, _), squared_norm in zip(named, squared_norms):
        importance[index] = importance.get(index, 0.0) + float(squared_norm)
    return importance


def resolve_layer_selection(model: nn.Module, config: LayerSelectConfig, batches=None, loss_fn=None) -> LayerSelectConfig:
    """The same config with an explicit ``layers`` list, checked against the model's layers."""
    if config.resolved:
        check_layers_exist(model, config)
        return config
    existing = decoder_layer_indices(model, config)
    if config.top_k > len(existing):
        raise AdapterError(f"layer-select: top_k={config.top_k} but {type(model).__name__} has {len(existing)} layers")
    if config.by_importance:
        if batches is None or loss_fn is None:
            raise AdapterError("layer-select: by_importance needs training batches (it runs in the training hook's prepare)")
        importance = layer_importance(model, config, batches, loss_fn)
        chosen = sorted(existing, key=lambda i: importance.get(i, 0.0), reverse=True)[: config.top_k]
    else:
        chosen = existing[-config.top_k:]
    data = config.model_dump(exclude={"top_k", "by_importance", "layers_to_transform"})
    return LayerSelectConfig(**{**data, "layers": sorted(chosen)})


class LayerSelection(TrainingHooks):
    """Resolves ``top_k`` / ``by_importance`` (and checks explicit layers) before training starts."""

    def __init__(self, adapter_name: str, config: LayerSelectConfig):
        self.adapter_name = adapter_name
        self.config = config

    def prepare(self, model, batches, loss_fn):
        from tuneforge.adapters.model import add_adapter, delete_adapter

        resolved = resolve_layer_selection(model, self.config, batches, loss_fn)
        if resolved is self.config:
            return
        delete_adapter(model, self.adapter_name)
        add_adapter(model, resolved, self.adapter_name)


def layer_select_hooks(model: nn.Module, adapter_name: str, config: LayerSelectConfig) -> TrainingHooks:
    return LayerSelection(adapter_name, config)
