"""DoRA (Liu et al. 2024): weight = m · (W + s·BA) / ||W + s·BA||, with a trainable magnitude m.

Paper: Liu et al., "DoRA: Weight-Decomposed Low-Rank Adaptation", ICML 2024, arXiv:2402.09353: the
decomposition of its §4 (magnitude m times W + ΔW normalised per output feature, ΔW = BA) with the norm
treated as a constant in backward as its §4.3 prescribes; PEFT does the same.

Forward reuses the base layer's output instead of a second full matmul:

    out_dora = out_base + (m/‖W'‖ − 1) · W x + (m/‖W'‖) · s·B A x,   W' = W + s·BA

where ‖·‖ is the per-output-row norm, detached as in the paper's §4.3 (it saves memory and
changes gradients only slightly). With dropout active, W x is recomputed on the dropped input so
the identity above still holds for the dropped activations.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tuneforge.adapters.layer import _write_weight
from tuneforge.adapters.lora.lora import LoraLinear, refuse_quantized_merge


class DoraLinear(LoraLinear):
    def __init__(self, base_layer: nn.Module, in_features: int, out_features: int, r: int, alpha: float,
                 dropout: float, use_rslora: bool, init: str, transposed: bool):
        super().__init__(in_features, out_features, r, alpha, dropout, use_rslora, init, transposed)
        with torch.no_grad():
            magnitude = self._adapted_weight_norm(base_layer).float()
        self.lora_magnitude_vector = nn.Parameter(magnitude)  # (out,)
        self.register_buffer("_merged_norm", None, persistent=False)

    def _weight_out_in(self, base_layer) -> torch.Tensor:
        weight = base_layer.weight
        return weight.T if self.transposed else weight  # (out, in)

    def _adapted_weight_norm(self, base_layer) -> torch.Tensor:
        adapted = self._weight_out_in(base_layer).to(self.lora_A.dtype) + (self.lora_B @ self.lora_A) * self.scaling
        return adapted.norm(p=2, dim=1)  # (out,)

    def transform_output(self, x, out, base_layer):
        scale = self.lora_magnitude_vector / self._adapted_weight_norm(base_layer).detach()  # (out,)
        dropped = self.dropout(x)
        if isinstance(self.dropout, nn.Identity) or not self.training:
            base_no_bias = out if base_layer.bias is None else out - base_layer.bias
        else:
            base_no_bias = F.linear(dropped, self._weight_out_in(base_layer))
        lora = F.linear(F.linear(dropped.to(self.lora_A.dtype), self.lora_A), self.lora_B) * self.scaling
        return out + ((scale - 1) * base_no_bias + scale * lora).to(out.dtype)

    def delta_weight(self, base_layer) -> torch.Tensor:
        """Merged weight minus W; DoRA's delta depends on W, unlike LoRA's."""
        weight = self._weight_out_in(base_layer).to(self.lora_A.dtype)
        adapted = weight + (self.lora_B @ self.lora_A) * self.scaling
        merged = adapted * (self.lora_magnitude_vector / adapted.norm(p=2, dim=1)).unsqueeze(1)
        delta = merged - weight
        return delta.T if self.transposed else delta

    def merge(self, base_layer, safe):
        refuse_quantized_merge(base_layer)
        with torch.no_grad():
            norm = self._adapted_weight_norm(base_layer)
            merged = base_layer.weight.data + self.delta_weight(base_layer).to(base_layer.weight.dtype)
        _write_weight(base_layer.weight, merged, safe, self)
        self._merged_norm = norm

    def unmerge(self, base_layer):
        """W = W_merged · ‖W'‖/m − s·BA, with ‖W'‖ remembered from merge time."""
        with torch.no_grad():
            merged = self._weight_out_in(base_layer).to(self.lora_A.dtype)
            weight = merged * (self._merged_norm / self.lora_magnitude_vector).unsqueeze(1)
            weight = weight - (self.lora_B @ self.lora_A) * self.scaling
            base_layer.weight.data.copy_((weight.T if self.transposed else weight).to(base_layer.weight.dtype))
        self._merged_norm = None

    def file_tensors(self):
        return {**super().file_tensors(), "lora_magnitude_vector": self.lora_magnitude_vector}

    def parameter_roles(self):
        return {**super().parameter_roles(), "magnitude": [self.lora_magnitude_vector]}
