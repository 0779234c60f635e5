"""Hydra (Kim et al. 2024, "Hydra: Multi-head Low-rank Adaptation for Parameter Efficient Fine-tuning",
arXiv:2309.06922).

A parallel LoRA branch on the layer input plus a sequential branch on the pretrained features
(the paper's Eq. for the Hydra layer, h = W x + B_p A_p x + B_s A_s W x, with LoRA's scale s)::

    h = W x + b + s · B_p A_p x + s · B_s A_s (W x + b)        s = alpha / r

The sequential branch is a low-rank linear combination of the base layer's full output. The paper
writes bias-free layers; for a layer with a bias we follow the official code, whose sequential branch
takes the pretrained layer's output as it is, bias included. Both B's start at zero, so the layer is
unchanged at init. Merged, the weight and the bias both change::

    W' = (I + s B_s A_s) W + s B_p A_p,        b' = (I + s B_s A_s) b

Unmerging inverts I + s B_s A_s with the Woodbury identity (an r×r solve, in float64), so no copy of W
is kept; the rounding of the merged float32 weights is amplified by the condition number of I + s B_s A_s,
which stays near 1 for trained adapters but grows if an eigenvalue of s A_s B_s nears −1.
When several adapters are stacked, the sequential branch sees the output of the adapters before it,
which is exactly what merging them in that order produces. PEFT has no Hydra.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from tuneforge.adapters.config import AdapterConfig
from tuneforge.adapters.layer import LayerAdapter
from tuneforge.adapters.lora.lora import check_rank, is_transposed, refuse_quantized_merge, weight_shape
from tuneforge.errors import AdapterError


class HydraConfig(AdapterConfig):
    method: Literal["hydra"] = "hydra"
    r: int = Field(8, gt=0, description="rank of each branch")
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout on the parallel branch's input")
    fan_in_fan_out: bool = False  # PEFT's flag for GPT-2's Conv1D; the layout is detected from the layer


class HydraLinear(LayerAdapter):
    def __init__(self, in_features: int, out_features: int, r: int, alpha: float, dropout: float, transposed: bool):
        super().__init__()
        self.scaling = alpha / r
        self.transposed = transposed
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_A = nn.Parameter(torch.empty(r, in_features))  # parallel A_p: (r, in)
        self.lora_B = nn.Parameter(torch.zeros(out_features, r))  # parallel B_p: (out, r)
        self.seq_A = nn.Parameter(torch.empty(r, out_features))  # sequential A_s: (r, out)
        self.seq_B = nn.Parameter(torch.zeros(out_features, r))  # sequential B_s: (out, r)
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.kaiming_uniform_(self.seq_A, a=math.sqrt(5))

    def transform_output(self, x, out, base_layer):
        dtype = self.lora_A.dtype
        features = out.to(dtype)  # W x + b (+ earlier adapters): the pretrained features, bias included
        parallel = F.linear(F.linear(self.dropout(x).to(dtype), self.lora_A), self.lora_B)
        sequential = F.linear(F.linear(features, self.seq_A), self.seq_B)
        return out + ((parallel + sequential) * self.scaling).to(out.dtype)

    def delta_weight(self, base_layer) -> torch.Tensor:
        weight = _out_in(base_layer).to(self.lora_A.dtype)
        delta = (self.lora_B @ self.lora_A + self.seq_B @ (self.seq_A @ weight)) * self.scaling  # (out, in)
        return delta.T if self.transposed else delta

    def bias_delta(self, base_layer) -> torch.Tensor | None:
        """Δb = s B_s A_s b: the sequential branch applied to the base bias (None without a bias)."""
        bias = getattr(base_layer, "bias", None)
        if bias is None:
            return None
        return self.seq_B @ (self.seq_A @ bias.detach().to(self.seq_A.dtype)) * self.scaling  # (out,)

    def merge(self, base_layer, safe):
        refuse_quantized_merge(base_layer)
        bias_delta = self.bias_delta(base_layer)
        if safe and bias_delta is not None and not torch.isfinite(bias_delta).all():
            raise AdapterError("safe merge refused: merging HydraLinear would put NaN/Inf into the base bias; "
                               "the base model is unchanged. Check the adapter for diverged values.")
        super().merge(base_layer, safe)
        if bias_delta is not None:
            base_layer.bias.data += bias_delta.to(base_layer.bias.dtype)

    def unmerge(self, base_layer):
        """W = (I + U V)⁻¹ (W' − s B_p A_p) and b = (I + U V)⁻¹ b', with U = s B_s, V = A_s and
        (I + U V)⁻¹ = I − U (I_r + V U)⁻¹ V (Woodbury)."""
        # In float64: I + U V can be poorly conditioned, and the error lands in the base weights.
        merged = _out_in(base_layer).double()
        rest = merged - self.lora_B.double() @ self.lora_A.double() * self.scaling  # (I + U V) W
        original = self._undo_sequential(rest)
        weight = base_layer.weight
        weight.data.copy_((original.T if self.transposed else original).to(weight.dtype))
        bias = getattr(base_layer, "bias", None)
        if bias is not None:
            bias.data.copy_(self._undo_sequential(bias.detach().double()[:, None])[:, 0].to(bias.dtype))

    def _undo_sequential(self, merged: torch.Tensor) -> torch.Tensor:
        """(I + U V)⁻¹ M for M (out, k), in float64."""
        u, v = self.seq_B.double() * self.scaling, self.seq_A.double()
        small = torch.eye(v.shape[0], device=v.device, dtype=v.dtype) + v @ u  # (r, r)
        return merged - u @ torch.linalg.solve(small, v @ merged)

    def file_tensors(self):
        return {"lora_A.weight": self.lora_A, "lora_B.weight": self.lora_B,
                "hydra_seq_A.weight": self.seq_A, "hydra_seq_B.weight": self.seq_B}

    def parameter_roles(self):
        return {"lora_A": [self.lora_A, self.seq_A], "lora_B": [self.lora_B, self.seq_B]}


def _out_in(base_layer: nn.Module) -> torch.Tensor:
    """The base weight as (out, in), whatever the layer's storage layout."""
    weight = base_layer.weight.detach()
    return weight.T if is_transposed(base_layer) else weight


def build_hydra(base_layer: nn.Module, config: HydraConfig, module_name: str) -> LayerAdapter:
    in_features, out_features = weight_shape(base_layer)
    check_rank(config.r, in_features, out_features, module_name)
    return HydraLinear(in_features, out_features, config.r, config.alpha, config.dropout, is_transposed(base_layer))
