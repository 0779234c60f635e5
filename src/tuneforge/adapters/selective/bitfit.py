"""BitFit (Ben Zaken et al. 2022, "BitFit: Simple Parameter-efficient Fine-tuning for
Transformer-based Masked Language-models", ACL 2022, arXiv:2106.10199, Section 3): train only the model's existing bias terms.

The paper freezes every weight matrix and trains the bias terms: for a target layer ``h = W x + b``,
b trains and W stays frozen. We keep b frozen too and train a delta, ``h = W x + (b + Δb)`` with
Δb = 0 at init, which is the same function with the same gradient, so the base stays untouched and
only the Δb vectors are saved. Merging adds Δb to the layer's bias. The paper's LayerNorm biases are
not targeted here (``ln-tuning`` trains norm parameters).

As published, BitFit only has biases to train where the model has them. On a model whose linear
layers have no bias (Llama, Mistral, Qwen2's o_proj and MLP, ...) a target without a bias is an
error naming the layer, never a silent run with nothing to train. ``add_missing_biases: true`` is a
departure from the paper: it gives such layers a new trainable bias (zeros at init). Merging one of
those refuses unless ``merge_adds_bias: true``, because merging then adds a ``bias`` tensor the base
checkpoint does not have (a model saved afterwards has extra keys, which some loaders reject).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from tuneforge.adapters.config import AdapterConfig
from tuneforge.adapters.layer import LayerAdapter
from tuneforge.adapters.lora.lora import weight_shape
from tuneforge.errors import AdapterError


class BitFitConfig(AdapterConfig):
    """Bias deltas on the target layers (default: every Linear/Conv1D except the output head).

    add_missing_biases: give target layers that have no bias a new trainable one (not in the paper;
    default: such a target is an error, since it has no bias to train).
    merge_adds_bias: when a target layer has no bias, merging creates one holding Δb (default: refuse).
    """

    method: Literal["bitfit"] = "bitfit"
    add_missing_biases: bool = False
    merge_adds_bias: bool = False


class BitFitLayer(LayerAdapter):
    def __init__(self, out_features: int, merge_adds_bias: bool, module_name: str):
        super().__init__()
        self.bias_delta = nn.Parameter(torch.zeros(out_features))  # (out,)
        self.merge_adds_bias = merge_adds_bias
        self.module_name = module_name
        self._added_bias = False

    def transform_output(self, x, out, base_layer):
        return out + self.bias_delta.to(out.dtype)

    def merge(self, base_layer, safe):
        if safe and not torch.isfinite(self.bias_delta).all():
            raise AdapterError("safe merge refused: the BitFit bias delta holds NaN/Inf; the base model is unchanged")
        if base_layer.bias is not None:
            with torch.no_grad():
                base_layer.bias += self.bias_delta.to(base_layer.bias.dtype)
            return
        if not self.merge_adds_bias:
            raise AdapterError(
                f"bitfit: '{self.module_name}' has no bias, so merging would add a new 'bias' tensor the base "
                "checkpoint lacks. Set merge_adds_bias: true in the adapter config to allow it, or keep the "
                "adapter unmerged."
            )
        weight = base_layer.weight
        base_layer.bias = nn.Parameter(self.bias_delta.detach().to(weight.dtype).clone(), requires_grad=False)
        self._added_bias = True

    def unmerge(self, base_layer):
        if self._added_bias:
            base_layer.bias = None
            self._added_bias = False
            return
        with torch.no_grad():
            base_layer.bias -= self.bias_delta.to(base_layer.bias.dtype)

    def file_tensors(self):
        return {"bias_delta": self.bias_delta}


def build_bitfit(base_layer: nn.Module, config: BitFitConfig, module_name: str) -> LayerAdapter:
    if isinstance(base_layer, nn.Embedding):
        raise AdapterError(f"bitfit: '{module_name}' is an Embedding, which has no bias; exclude it")
    if getattr(base_layer, "bias", None) is None and not config.add_missing_biases:
        raise AdapterError(
            f"bitfit: '{module_name}' ({type(base_layer).__name__}) has no bias, and BitFit as published trains "
            "only the biases a model already has (models such as Llama have no linear biases at all). Target "
            "layers that have a bias (adapter.target_modules), or set adapter.add_missing_biases: true to give "
            "bias-free layers a new trainable bias."
        )
    _, out_features = weight_shape(base_layer)
    return BitFitLayer(out_features, config.merge_adds_bias, module_name)
