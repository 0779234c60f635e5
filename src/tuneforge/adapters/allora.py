"""ALLoRA (Huang & Balestriero 2024, "ALLoRA: Adaptive Learning Rate Mitigates LoRA Fatal Flaws").

A LoRA without dropout and without the alpha/r scaling factor (h = W x + B A x), whose gradients are
rescaled per row inversely to that row's ℓ2 norm before each optimizer step::

    ∇θ_i ← ∇θ_i / sqrt(‖θ_i‖² + 1/η²)        θ_i: a row of B (one output feature) or of A (one rank)

Rows near zero (B at init) get their gradient multiplied by up to η, so B escapes zero quickly; large
rows take smaller steps, which replaces the scaling factor's damping per row rather than per layer.
The 1/η² term bounds the boost (the paper's abstract: a coefficient inversely proportional to the
parameters' ℓ2 norm). The file is an ordinary PEFT ``LORA`` file with lora_alpha = r (scaling 1).
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import torch
from pydantic import Field
from torch import nn

from tuneforge.adapters.config import AdapterConfig
from tuneforge.adapters.hooks import TrainingHooks
from tuneforge.adapters.layer import LayerAdapter
from tuneforge.adapters.lora import LoraLinear, check_rank, is_transposed, weight_shape


class AlloraConfig(AdapterConfig):
    method: Literal["allora"] = "allora"
    r: int = Field(8, gt=0)
    eta: float = Field(4.0, gt=0.0, description="largest gradient multiplier, reached by all-zero rows")
    fan_in_fan_out: bool = False  # PEFT's flag for GPT-2's Conv1D; the layout is detected from the layer

    peft_type: ClassVar[str] = "LORA"

    def to_peft_dict(self) -> dict[str, Any]:
        data = super().to_peft_dict()
        # No scaling factor: PEFT's scaling is lora_alpha / r, so alpha = r gives 1.
        data.update(lora_alpha=self.r, lora_dropout=0.0, init_lora_weights=True)
        return data

    @classmethod
    def from_peft_dict(cls, data: dict[str, Any], source: str = "adapter_config.json") -> "AdapterConfig":
        data = {k: v for k, v in data.items() if k not in ("lora_alpha", "lora_dropout", "init_lora_weights")}
        return super().from_peft_dict(data, source)


def row_scales(param: torch.Tensor, eta: float) -> torch.Tensor:
    """1 / sqrt(‖row‖² + 1/η²) for each row of a 2-D parameter, as a (rows, 1) column."""
    return (param.detach().float().pow(2).sum(dim=1, keepdim=True) + 1.0 / eta ** 2).rsqrt()


def build_allora(base_layer: nn.Module, config: AlloraConfig, module_name: str) -> LayerAdapter:
    in_features, out_features = weight_shape(base_layer)
    check_rank(config.r, in_features, out_features, module_name)
    return LoraLinear(in_features, out_features, config.r, alpha=config.r, dropout=0.0, use_rslora=False,
                      init="kaiming", transposed=is_transposed(base_layer))


class AlloraGradientScaling(TrainingHooks):
    """Rescales each row's gradient of one ALLoRA adapter before every optimizer step."""

    def __init__(self, model: nn.Module, adapter_name: str, config: AlloraConfig):
        self.model = model
        self.adapter_name = adapter_name
        self.config = config

    def before_optimizer_step(self, model, step, total_steps):
        from tuneforge.adapters.model import wrapped_layers

        with torch.no_grad():
            for _, layer in wrapped_layers(self.model):
                adapter = dict(layer.adapters).get(self.adapter_name)
                if not isinstance(adapter, LoraLinear):
                    continue
                for param in (adapter.lora_A, adapter.lora_B):
                    if param.grad is not None:
                        param.grad.mul_(row_scales(param, self.config.eta).to(param.grad.dtype))


def allora_hooks(model: nn.Module, adapter_name: str, config: AlloraConfig) -> AlloraGradientScaling:
    return AlloraGradientScaling(model, adapter_name, config)
