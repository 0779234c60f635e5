"""MoLE / MixLoRA: a mixture of LoRA experts with a learned top-k router per FFN projection.

Each targeted projection (by default Llama's ``gate_proj``, ``up_proj``, ``down_proj``) holds
``num_experts`` LoRA experts and a linear router over its input. Every token picks its top-k
experts and mixes them with a softmax over the selected logits (LLaVA-MoLE uses k = 1,
MixLoRA k = 2)::

    g(x) = softmax over the top-k of (R x),     h = W x + s · Σ_{e ∈ top-k(x)} g_e(x) B_e A_e x

(for k = 1, g is the full softmax probability of the chosen expert, as in the Switch Transformer:
a softmax over a single logit is always 1 and would give the router no gradient.)

B_e starts at zero, so the layer is the base layer at init. A Switch-Transformer load-balancing
loss keeps the experts in use: with f_e the fraction of (token, slot) assignments that go to
expert e and P_e the mean router probability of e (softmax over all experts),

    aux = E · Σ_e f_e P_e     (1 when routing is uniform)

averaged over layers and added with ``aux_loss_weight`` through ``TrainingHooks.extra_loss``.
All tokens of the batch count, padding included (the layer does not see the attention mask).
The routing depends on the input, so the adapter cannot be merged into the weights.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from tuneforge.adapters.config import AdapterConfig, TargetSpec
from tuneforge.adapters.hooks import TrainingHooks
from tuneforge.adapters.layer import LayerAdapter
from tuneforge.adapters.lora import check_rank, lora_scaling, weight_shape
from tuneforge.errors import AdapterError


class MoleConfig(AdapterConfig):
    method: Literal["mole"] = "mole"
    target_modules: TargetSpec = Field(default_factory=lambda: ["gate_proj", "up_proj", "down_proj"])
    num_experts: int = Field(4, ge=1)
    top_k: int = Field(2, ge=1)
    r: int = Field(8, gt=0)
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    aux_loss_weight: float = Field(0.01, ge=0.0)
    # False: the experts are fixed (buffers) and only the routers train, as when routing over
    # existing LoRAs (MeteoRA; see lora_router.add_lora_router).
    train_experts: bool = True

    @model_validator(mode="after")
    def _top_k_within_experts(self):
        if self.top_k > self.num_experts:
            raise ValueError(
                f"top_k={self.top_k} exceeds num_experts={self.num_experts}: a token cannot pick more experts "
                "than exist; lower top_k or raise num_experts"
            )
        return self


class MoleLinear(LayerAdapter):
    mergeable = False

    def __init__(self, in_features: int, out_features: int, config: MoleConfig):
        super().__init__()
        experts, r = config.num_experts, config.r
        self.top_k = config.top_k
        # Routing statistics are kept only for a training pass that will add the aux loss.
        self.record_routing = config.aux_loss_weight > 0
        self.scaling = lora_scaling(config.alpha, r, use_rslora=False)
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        down = torch.empty(experts, r, in_features)  # (E, r, in)
        for a in down:
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        up = torch.zeros(experts, out_features, r)  # (E, out, r)
        self.train_experts = config.train_experts
        if config.train_experts:
            self.mole_A, self.mole_B = nn.Parameter(down), nn.Parameter(up)
        else:
            self.register_buffer("mole_A", down)
            self.register_buffer("mole_B", up)
        self.mole_router = nn.Parameter(torch.empty(experts, in_features))  # (E, in)
        nn.init.kaiming_uniform_(self.mole_router, a=math.sqrt(5))
        self.routing_stats: tuple[torch.Tensor, torch.Tensor] | None = None

    def route(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """tokens (T, in) -> probabilities over all experts (T, E), chosen experts (T, k), their weights (T, k)."""
        logits = tokens @ self.mole_router.T  # (T, E)
        probabilities = logits.softmax(-1)
        chosen_logits, chosen = logits.topk(self.top_k, dim=-1)
        if self.top_k == 1:
            # A softmax over one logit is constant 1 and would never train the router; like the
            # Switch Transformer, top-1 weighs its expert by the full softmax probability.
            return probabilities, chosen, probabilities.gather(-1, chosen)
        return probabilities, chosen, chosen_logits.softmax(-1)

    def transform_output(self, x, out, base_layer):
        tokens = x.reshape(-1, x.shape[-1]).to(self.mole_A.dtype)  # (T, in)
        probabilities, chosen, weights = self.route(tokens)
        if self.record_routing and self.training and torch.is_grad_enabled():
            self.routing_stats = (probabilities, chosen)
        dropped = self.dropout(tokens)
        mixed = torch.zeros(tokens.shape[0], self.mole_B.shape[1], dtype=tokens.dtype, device=tokens.device)
        for expert in range(self.mole_A.shape[0]):
            rows, slot = (chosen == expert).nonzero(as_tuple=True)
            if rows.numel() == 0:
                continue
            update = F.linear(F.linear(dropped[rows], self.mole_A[expert]), self.mole_B[expert])  # (n, out)
            mixed = mixed.index_add(0, rows, update * weights[rows, slot, None])
        return out + (mixed * self.scaling).view(*out.shape[:-1], -1).to(out.dtype)

    def load_balancing_loss(self) -> torch.Tensor | None:
        """E · Σ_e f_e P_e of the last forward pass (then forgotten, so each pass counts once)."""
        if self.routing_stats is None:
            return None
        probabilities, chosen = self.routing_stats
        self.routing_stats = None
        experts = probabilities.shape[-1]
        assignments = F.one_hot(chosen, experts).to(probabilities.dtype).sum(dim=1)  # (T, E)
        fraction = assignments.mean(0) / chosen.shape[-1]
        return experts * (fraction * probabilities.mean(0)).sum()

    def merge(self, base_layer, safe):
        raise AdapterError(
            "a mixture of LoRA experts cannot be merged into the weights: each token picks its own experts, so "
            "there is no single ΔW. The base model is unchanged; keep the adapter unmerged"
        )

    def delta_weight(self, base_layer):
        raise AdapterError("a mixture of LoRA experts has no single ΔW (the routing depends on the input)")

    def file_tensors(self):
        return {"mole_A": self.mole_A, "mole_B": self.mole_B, "mole_router": self.mole_router}

    def parameter_roles(self):
        if not self.train_experts:
            return {"router": [self.mole_router]}
        return {"lora_A": [self.mole_A], "lora_B": [self.mole_B], "router": [self.mole_router]}


class LoadBalancing(TrainingHooks):
    """aux_loss_weight · (mean over layers of E · Σ_e f_e P_e), from each layer's last forward pass."""

    def __init__(self, adapter_name: str, weight: float):
        self.adapter_name = adapter_name
        self.weight = weight

    def extra_loss(self, model):
        from tuneforge.adapters.model import wrapped_layers

        losses = [loss for _, layer in wrapped_layers(model) if self.adapter_name in layer.adapters
                  and (loss := layer.adapters[self.adapter_name].load_balancing_loss()) is not None]
        return self.weight * torch.stack(losses).mean() if losses else None


def mole_hooks(model: nn.Module, adapter_name: str, config: MoleConfig) -> TrainingHooks | None:
    return LoadBalancing(adapter_name, config.aux_loss_weight) if config.aux_loss_weight > 0 else None


def build_mole(base_layer: nn.Module, config: MoleConfig, module_name: str) -> LayerAdapter:
    if isinstance(base_layer, nn.Embedding):
        raise AdapterError(f"MoLE on the Embedding '{module_name}' is not supported; target the FFN projections")
    in_features, out_features = weight_shape(base_layer)
    check_rank(config.r, in_features, out_features, module_name)
    return MoleLinear(in_features, out_features, config)
