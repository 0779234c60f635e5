"""SoRA (Ding et al. 2023, "Sparse Low-rank Adaptation of Pre-trained Language Models", EMNLP 2023,
arXiv:2311.11696).

A gate vector g (one entry per rank) sits between A and B (paper eq. 2)::

    h = W x + s · B (g ⊙ A x),   s = alpha / r,   B = 0 at init (identity), g ~ N(0, 1)

The gate trains with the other adapter parameters; after every optimizer step it takes the proximal
step of an L1 penalty, the soft threshold (paper eq. 4)::

    g ← sign(g) · max(|g| − ξ(t), 0)

Gates that reach zero switch their rank off; the ``effective_ranks`` are the non-zero gates, and zero
ranks can be removed after training.

Paper vs reference code: the paper thresholds by η_t·ξ (learning rate times L1 strength). The
official code (TsinghuaC3I/SoRA, ``SparseAdamW``) thresholds by ``sparse_lambda_2`` = ξ directly after
each AdamW step of the gate, initialises the gate with ``torch.randn``, and trains it at the model's
learning rate. We follow the reference code: ``sora_lambda`` is ξ, the per-step threshold (the
reference's default, 1e-3), and gates start Gaussian, so the gates that start small are pruned within
a few hundred steps (η_t·ξ with a 2e-4 learning rate would be 2e-7 per step: nothing would ever be
pruned). Departures: the reference also adds ``sparse_lambda · mean|g|`` to the loss, which we leave
out (its gradient is a constant sign the proximal step already applies), and its sparsifying scheduler
raises ξ in stages across several training runs; ``lambda_schedule="linear"`` ramps ξ from 0 to
``sora_lambda`` within one run instead. The file stores A, B (LoRA's leaf names) and the gate; PEFT has
no SoRA.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from tuneforge.adapters.config import AdapterConfig
from tuneforge.adapters.hooks import TrainingHooks
from tuneforge.adapters.layer import LayerAdapter
from tuneforge.adapters.lora.lora import check_rank, is_transposed, refuse_quantized_merge, weight_shape


class SoraConfig(AdapterConfig):
    method: Literal["sora"] = "sora"
    r: int = Field(8, gt=0, description="largest rank; the gate switches ranks off")
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    sora_lambda: float = Field(
        1e-3, ge=0.0, description="ξ: the gates' soft threshold per optimizer step (reference code's sparse_lambda_2)")
    lambda_schedule: Literal["constant", "linear"] = Field(
        "constant", description="linear: ξ ramps from 0 to sora_lambda over the run")
    fan_in_fan_out: bool = False  # PEFT's flag for GPT-2's Conv1D; the layout is detected from the layer


def soft_threshold(values: torch.Tensor, threshold: float) -> torch.Tensor:
    """The proximal operator of threshold·‖·‖₁: shrink towards 0 by ``threshold``, clamp at 0."""
    return values.sign() * (values.abs() - threshold).clamp_min(0.0)


class SoraLinear(LayerAdapter):
    def __init__(self, in_features: int, out_features: int, r: int, alpha: float, dropout: float, transposed: bool):
        super().__init__()
        self.r = r
        self.scaling = alpha / r
        self.transposed = transposed
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_A = nn.Parameter(torch.empty(r, in_features))  # (r, in)
        self.gate = nn.Parameter(torch.randn(r))  # (r,), Gaussian as in the reference code
        self.lora_B = nn.Parameter(torch.zeros(out_features, r))  # (out, r)
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def transform_output(self, x, out, base_layer):
        x = self.dropout(x).to(self.lora_A.dtype)
        gated = F.linear(x, self.lora_A) * self.gate  # (..., r)
        return out + (F.linear(gated, self.lora_B) * self.scaling).to(out.dtype)

    def delta_weight(self, base_layer) -> torch.Tensor:
        delta = (self.lora_B * self.gate) @ self.lora_A * self.scaling  # (out, in)
        return delta.T if self.transposed else delta

    def merge(self, base_layer, safe):
        refuse_quantized_merge(base_layer)
        super().merge(base_layer, safe)

    def effective_rank(self) -> int:
        return int(torch.count_nonzero(self.gate))

    def file_tensors(self):
        return {"lora_A.weight": self.lora_A, "lora_B.weight": self.lora_B, "lora_gate": self.gate}

    def parameter_roles(self):
        return {"lora_A": [self.lora_A], "gate": [self.gate], "lora_B": [self.lora_B]}


def build_sora(base_layer: nn.Module, config: SoraConfig, module_name: str) -> LayerAdapter:
    in_features, out_features = weight_shape(base_layer)
    check_rank(config.r, in_features, out_features, module_name)
    return SoraLinear(in_features, out_features, config.r, config.alpha, config.dropout, is_transposed(base_layer))


def sora_layers(model: nn.Module, adapter_name: str) -> list[tuple[str, SoraLinear]]:
    from tuneforge.adapters.model import wrapped_layers

    found = [(layer_name, dict(layer.adapters).get(adapter_name)) for layer_name, layer in wrapped_layers(model)]
    return [(layer_name, adapter) for layer_name, adapter in found if isinstance(adapter, SoraLinear)]


def effective_ranks(model: nn.Module, adapter_name: str = "default") -> dict[str, int]:
    """Non-zero gates per adapted layer of SoRA adapter ``adapter_name``."""
    return {name: adapter.effective_rank() for name, adapter in sora_layers(model, adapter_name)}


class SoraGateHook(TrainingHooks):
    """The proximal L1 step on every gate of one SoRA adapter, after each optimizer step."""

    def __init__(self, model: nn.Module, adapter_name: str, config: SoraConfig):
        self.model = model
        self.adapter_name = adapter_name
        self.config = config

    def threshold(self, step: int, total_steps: int) -> float:
        """ξ(t), applied as is (the reference's SparseAdamW), not scaled by a learning rate."""
        strength = self.config.sora_lambda
        if self.config.lambda_schedule == "linear":
            strength *= (step + 1) / max(1, total_steps)
        return strength

    def after_optimizer_step(self, model, step, total_steps):
        threshold = self.threshold(step, total_steps)
        with torch.no_grad():
            for _, adapter in sora_layers(self.model, self.adapter_name):
                adapter.gate.copy_(soft_threshold(adapter.gate, threshold))


def sora_hooks(model: nn.Module, adapter_name: str, config: SoraConfig) -> SoraGateHook:
    return SoraGateHook(model, adapter_name, config)
