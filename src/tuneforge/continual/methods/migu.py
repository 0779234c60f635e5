"""``migu``: magnitude-based gradient updating (Du et al. 2024, "Unlocking Continual Learning Abilities
in Language Models", EMNLP Findings, arXiv:2406.17245).

    method: {name: migu, top_fraction: 0.5}

MIGU caches, in the forward pass, the L1-normalized magnitude of each linear layer's output,
m_i = Σ_tokens |o_i| / Σ_j Σ_tokens |o_j|, and after backward keeps the gradient only of the weight rows
whose m_i is among the top T (a binary top-T mask, ``top_fraction`` of the output features); the
other rows do not move this step. Here the adapted linear layers' outputs (base + LoRA) are
measured and the mask applies to LoRA's up-projection rows (``lora_B``, one row per output feature),
the part of ΔW = B A that writes each output. One adapter is carried from task to task; no data and
no task labels are kept, as in the paper. The mask is applied in the loop's
``before_optimizer_step`` hook, after clipping (which measures the whole gradient) and before AdamW.
"""

from __future__ import annotations

import math

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from tuneforge.adapters.hooks import TrainingHooks
from tuneforge.adapters.model import wrapped_layers
from tuneforge.continual.methods.base import ADAPTER_NAME, ContinualMethod, Stage
from tuneforge.continual.methods.lora_layers import lora_layers, require_lora


class MiguOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    top_fraction: float = Field(0.5, gt=0, le=1, description="T: the fraction of output features whose rows update")


def top_mask(magnitude: torch.Tensor, fraction: float) -> torch.Tensor:
    """Boolean (out,) mask of the ceil(fraction * out) largest entries of ``magnitude``."""
    keep = max(1, math.ceil(fraction * magnitude.numel()))
    mask = torch.zeros_like(magnitude, dtype=torch.bool)
    mask[magnitude.topk(keep).indices] = True
    return mask


class MagnitudeMask(TrainingHooks):
    """Caches |output| per feature in training forwards; masks lora_B's gradient rows before the step."""

    def __init__(self, model: nn.Module, fraction: float):
        self.fraction = fraction
        self.layers = lora_layers(model, ADAPTER_NAME)
        self.magnitudes: dict[str, torch.Tensor] = {}
        modules = dict(wrapped_layers(model))
        self.handles = [modules[name].register_forward_hook(self._recorder(name)) for name in self.layers]

    def _recorder(self, layer_name: str):
        def hook(module, args, output):
            if not module.training:
                return
            magnitude = output.detach().abs().float().reshape(-1, output.shape[-1]).sum(0)  # (out,)
            cached = self.magnitudes.get(layer_name)
            self.magnitudes[layer_name] = magnitude if cached is None else cached + magnitude
        return hook

    def before_optimizer_step(self, model: nn.Module, step: int, total_steps: int) -> None:
        for layer_name, lora in self.layers.items():
            magnitude = self.magnitudes.get(layer_name)
            if magnitude is None or lora.lora_B.grad is None:
                continue
            normalized = magnitude / magnitude.sum().clamp_min(1e-12)  # L1-normalized, as in the paper
            keep = top_mask(normalized, self.fraction).to(lora.lora_B.grad.device)
            lora.lora_B.grad[~keep] = 0
        self.magnitudes.clear()


class Migu(ContinualMethod):
    name = "migu"
    options_class = MiguOptions

    def __init__(self, options, context):
        require_lora(context.train_config, self.name)
        super().__init__(options, context)

    def training_hooks(self, stage: Stage, model: nn.Module) -> list[TrainingHooks]:
        return [MagnitudeMask(model, self.options.top_fraction)]
