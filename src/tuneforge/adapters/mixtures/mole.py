"""Learned routers over already-trained LoRAs, one per adapted projection: the setting of MoLE (Wu et
al. 2024, "Mixture of LoRA Experts", ICLR 2024, arXiv:2404.13628, Section 3: gating learned over
trained LoRAs while they stay frozen) with the per-token top-k gate of MeteoRA (Xu et al. 2024), which routes inside every LoRA'd linear layer.

Build it with ``tuneforge.merge.lora_router.add_lora_router``, which fills the experts from LoRA files
and leaves only the routers trainable. Each targeted projection holds ``num_experts`` fixed experts
(A_e, B_e; each LoRA's scaling is folded into its B) and a linear router R over its input; every token
picks its top-k experts and mixes them with a softmax over the selected logits::

    g(x) = softmax over the top-k of (R x),     h = W x + s · Σ_{e ∈ top-k(x)} g_e(x) B_e A_e x

(for k = 1, g is the full softmax probability of the chosen expert, as in the Switch Transformer:
a softmax over a single logit is always 1 and would give the router no gradient). MoLE's own gate is
a dense softmax over all the LoRAs of a layer; the top-k gate here is MeteoRA's. A Switch-Transformer
load-balancing loss keeps the experts in use (see ``mixlora.LoadBalancing``). The routing depends on
the input, so the adapter cannot be merged into the weights.

This was also the ``mole`` *training* method, with trainable experts routed independently in each
projection (so one token could mix different experts in gate, up and down). That is neither MoLE nor
MixLoRA, so ``method: mole`` with trainable experts is refused with a pointer to ``method: mixlora``
(one router per FFN block, each expert a LoRA'd FFN; ``adapters/mixtures/mixlora.py``). Until
``add_lora_router`` fills them, the fixed experts are random placeholders.
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
from tuneforge.adapters.lora.lora import check_rank, lora_scaling, weight_shape
from tuneforge.adapters.mixtures.mixlora import LoadBalancing, RoutedExperts
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
    # Must be False: the experts are fixed (buffers) and only the routers train. True was the old
    # trainable-experts method, now mixlora; it is refused below with a pointer there.
    train_experts: bool = True

    @model_validator(mode="after")
    def _fixed_experts_and_top_k(self):
        if self.train_experts:
            raise ValueError(
                "method: mole no longer trains LoRA experts: it routed each projection on its own, so one token "
                "could mix different experts in gate, up and down, which is neither MoLE nor MixLoRA. Use "
                "method: mixlora (one top-k router per FFN block, each expert a LoRA'd FFN; target_modules: "
                "['mlp']). To learn routers over LoRAs you already trained (MoLE), use "
                "tuneforge.merge.lora_router.add_lora_router."
            )
        if self.top_k > self.num_experts:
            raise ValueError(
                f"top_k={self.top_k} exceeds num_experts={self.num_experts}: a token cannot pick more experts "
                "than exist; lower top_k or raise num_experts"
            )
        return self


class MoleLinear(RoutedExperts):
    mergeable = False

    def __init__(self, in_features: int, out_features: int, config: MoleConfig):
        super().__init__()
        experts, r = config.num_experts, config.r
        self.top_k = config.top_k
        # Routing statistics are kept only for a training pass that will add the aux loss.
        self.record_routing = config.aux_loss_weight > 0
        self.scaling = lora_scaling(config.alpha, r, use_rslora=False)
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        # Fixed experts: random placeholders until add_lora_router copies the trained LoRAs in.
        down = torch.empty(experts, r, in_features)  # (E, r, in)
        up = torch.empty(experts, out_features, r)  # (E, out, r)
        for a, b in zip(down, up):
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
            nn.init.kaiming_uniform_(b, a=math.sqrt(5))
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

    def file_tensors(self):
        return {"mole_A": self.mole_A, "mole_B": self.mole_B, "mole_router": self.mole_router}

    def parameter_roles(self):
        return {"router": [self.mole_router]}


def mole_hooks(model: nn.Module, adapter_name: str, config: MoleConfig) -> TrainingHooks | None:
    return LoadBalancing(adapter_name, config.aux_loss_weight) if config.aux_loss_weight > 0 else None


def build_mole(base_layer: nn.Module, config: MoleConfig, module_name: str) -> LayerAdapter:
    if isinstance(base_layer, nn.Embedding):
        raise AdapterError(f"LoRA routing on the Embedding '{module_name}' is not supported; target the FFN projections")
    in_features, out_features = weight_shape(base_layer)
    check_rank(config.r, in_features, out_features, module_name)
    return MoleLinear(in_features, out_features, config)
