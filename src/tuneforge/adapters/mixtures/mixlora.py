"""MixLoRA (Li et al. 2024, "MixLoRA: Enhancing Large Language Models Fine-Tuning with LoRA-based
Mixture of Experts", arXiv:2404.15159): a sparse mixture of LoRA'd FFN experts with one top-k router per FFN block.

The adapter wraps a whole FFN block (``target_modules: ["mlp"]``). Expert e is the frozen FFN with a
LoRA on each of its projections (W_p + s B_{p,e} A_{p,e} for p in gate/up/down, or GPT-2's c_fc/c_proj),
and one router R over the block's input picks the experts of each token, so a token uses the same
experts in every projection of the block (the paper's Eq. for the MixLoRA FFN, as in Mixtral)::

    p(x) = softmax(R x)        g(x) = p over its top-k entries, renormalised to sum to 1
    y = Σ_{e ∈ top-k(x)} g_e(x) · FFN_e(x)        FFN_e(x) = down_e(act(gate_e x) ⊙ up_e x)

Since Σ g_e = 1 this is computed as y = FFN(x) + Σ g_e (FFN_e(x) − FFN(x)); the frozen gate/up
outputs are shared by all experts, as in the reference code. All B's start at zero, so every expert
is the base FFN and the block is unchanged at init. For k = 1 the renormalised weight is always 1
and the router would get no gradient from the task; like the Switch Transformer we then weigh the
expert's change by its full softmax probability, y = FFN(x) + p_e(x) (FFN_e(x) − FFN(x)).

The auxiliary load-balancing loss is the Switch Transformer's, which MixLoRA uses: with f_e the
fraction of (token, slot) assignments that go to expert e and P_e the mean router probability of e,

    aux = E · Σ_e f_e P_e     (1 when routing is uniform)

averaged over the routed blocks and added with ``aux_loss_weight`` through ``TrainingHooks.extra_loss``.
All tokens of the batch count, padding included (the block does not see the attention mask). The
reference code (Mixtral's loss) differs in three details we do not follow: it pools the tokens of all
blocks into one f and one P, leaves padding out, and counts f per token rather than per (token, slot),
so its value is k times ours (k when routing is uniform). The router is a bias-free linear map
initialised N(0, 0.02²), as in the reference (``router_init_std``); its input jitter is not implemented.
MixLoRA also trains plain LoRAs on the attention projections; that is a separate LoRA adapter here.
The routing depends on the input, so the adapter cannot be merged into the weights. On GPT-2 the
block's output dropout applies to the base FFN's output only. PEFT has no MixLoRA.

This method was called ``mole``; MoLE proper (Wu et al. 2024) learns gates over LoRAs that are already
trained, which ``tuneforge.merge.lora_router.add_lora_router`` does (see ``adapters/mixtures/mole.py``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from tuneforge.adapters.config import AdapterConfig, TargetSpec
from tuneforge.adapters.hooks import TrainingHooks
from tuneforge.adapters.layer import AdaptedLayer, LayerAdapter
from tuneforge.adapters.lora.lora import check_rank, lora_scaling, weight_shape
from tuneforge.errors import AdapterError


class MixLoraConfig(AdapterConfig):
    method: Literal["mixlora"] = "mixlora"
    target_modules: TargetSpec = Field(default_factory=lambda: ["mlp"])
    num_experts: int = Field(8, ge=1)
    top_k: int = Field(2, ge=1)
    r: int = Field(8, gt=0)
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    aux_loss_weight: float = Field(0.01, ge=0.0)
    router_init_std: float = Field(0.02, gt=0.0)

    @model_validator(mode="after")
    def _top_k_within_experts(self):
        if self.top_k > self.num_experts:
            raise ValueError(
                f"top_k={self.top_k} exceeds num_experts={self.num_experts}: a token cannot pick more experts "
                "than exist; lower top_k or raise num_experts"
            )
        return self


@dataclass(frozen=True)
class FfnLayout:
    """Where a block keeps its projections: ``inputs`` read the block input, ``output`` reads act(...)."""

    inputs: tuple[str, ...]  # (gate, up) for a gated FFN, (c_fc,) for GPT-2
    output: str
    activation: str

    @property
    def projections(self) -> tuple[str, ...]:
        return (*self.inputs, self.output)


GATED_FFN = FfnLayout(inputs=("gate_proj", "up_proj"), output="down_proj", activation="act_fn")  # Llama, Mistral, Qwen2
PLAIN_FFN = FfnLayout(inputs=("c_fc",), output="c_proj", activation="act")  # GPT-2


def ffn_layout(block: nn.Module, module_name: str) -> FfnLayout:
    for layout in (GATED_FFN, PLAIN_FFN):
        if all(hasattr(block, name) for name in (*layout.projections, layout.activation)):
            return layout
    children = ", ".join(name for name, _ in block.named_children()) or "none"
    raise AdapterError(
        f"mixlora: '{module_name}' ({type(block).__name__}, children: {children}) is not an FFN block this method "
        "knows: it needs gate_proj/up_proj/down_proj with act_fn (Llama-style) or c_fc/c_proj with act (GPT-2). "
        "Target the MLP blocks, e.g. target_modules: ['mlp']."
    )


def _projection_base(block: nn.Module, name: str) -> nn.Module:
    module = getattr(block, name)
    return module.base_layer if isinstance(module, AdaptedLayer) else module


class RoutedExperts(LayerAdapter):
    """What every token-routed mixture shares: the Switch-Transformer load-balancing loss over the last
    forward's routing (``routing_stats`` = (probabilities (T, E), chosen experts (T, k))), and no ΔW."""

    routing_stats: tuple[torch.Tensor, torch.Tensor] | None = None

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


class MixLoraBlock(RoutedExperts):
    mergeable = False

    def __init__(self, block: nn.Module, layout: FfnLayout, config: MixLoraConfig, module_name: str):
        super().__init__()
        self.layout = layout
        self.top_k = config.top_k
        # Routing statistics are kept only for a training pass that will add the aux loss.
        self.record_routing = config.aux_loss_weight > 0
        self.scaling = lora_scaling(config.alpha, config.r, use_rslora=False)
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        experts = config.num_experts
        self.mixlora_A = nn.ParameterDict()
        self.mixlora_B = nn.ParameterDict()
        for name in layout.projections:
            in_features, out_features = weight_shape(_projection_base(block, name))
            check_rank(config.r, in_features, out_features, f"{module_name}.{name}")
            down = torch.empty(experts, config.r, in_features)  # (E, r, in)
            for a in down:
                nn.init.kaiming_uniform_(a, a=math.sqrt(5))
            self.mixlora_A[name] = nn.Parameter(down)
            self.mixlora_B[name] = nn.Parameter(torch.zeros(experts, out_features, config.r))  # (E, out, r)
        hidden = weight_shape(_projection_base(block, layout.inputs[0]))[0]
        self.mixlora_router = nn.Parameter(torch.randn(experts, hidden) * config.router_init_std)  # (E, hidden)
        self.routing_stats: tuple[torch.Tensor, torch.Tensor] | None = None

    def route(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """tokens (T, hidden) -> probabilities over all experts (T, E), chosen experts (T, k), their weights (T, k)."""
        probabilities = (tokens @ self.mixlora_router.T).softmax(-1)  # (T, E)
        chosen_probabilities, chosen = probabilities.topk(self.top_k, dim=-1)
        if self.top_k == 1:
            # Renormalised, a single expert's weight is constant 1 and would never train the router:
            # like the Switch Transformer, top-1 weighs its expert by its full softmax probability.
            return probabilities, chosen, chosen_probabilities
        return probabilities, chosen, chosen_probabilities / chosen_probabilities.sum(-1, keepdim=True)

    def _lora(self, name: str, expert: int, inputs: torch.Tensor) -> torch.Tensor:
        """s B_e A_e inputs for projection ``name``: (n, in) -> (n, out)."""
        hidden = F.linear(self.dropout(inputs), self.mixlora_A[name][expert])  # (n, r)
        return F.linear(hidden, self.mixlora_B[name][expert]) * self.scaling

    def transform_output(self, x, out, base_layer):
        layout = self.layout
        dtype = self.mixlora_router.dtype
        tokens = x.reshape(-1, x.shape[-1])  # (T, hidden)
        probabilities, chosen, weights = self.route(tokens.to(dtype))
        if self.record_routing and self.training and torch.is_grad_enabled():
            self.routing_stats = (probabilities, chosen)
        activation = getattr(base_layer, layout.activation)
        down = getattr(base_layer, layout.output)
        # The frozen input projections, shared by every expert: (T, intermediate) each.
        shared = [getattr(base_layer, name)(tokens).to(dtype) for name in layout.inputs]
        lora_in = tokens.to(dtype)
        mixed = torch.zeros(tokens.shape[0], out.shape[-1], dtype=dtype, device=tokens.device)
        for expert in range(self.mixlora_router.shape[0]):
            rows, slot = (chosen == expert).nonzero(as_tuple=True)
            if rows.numel() == 0:
                continue
            base_hidden = _combine(activation, [s[rows] for s in shared])  # the base FFN's inner activation
            expert_hidden = _combine(activation, [s[rows] + self._lora(name, expert, lora_in[rows])
                                                  for s, name in zip(shared, layout.inputs)])
            # down(h_e) − down(h) in one call of the (possibly wrapped or quantized) down projection.
            both = down(torch.cat([expert_hidden, base_hidden]).to(tokens.dtype)).to(dtype)
            change = both[: rows.numel()] - both[rows.numel():] + self._lora(layout.output, expert, expert_hidden)
            mixed = mixed.index_add(0, rows, change * weights[rows, slot, None])  # (T, hidden)
        return out + mixed.view(*out.shape[:-1], -1).to(out.dtype)

    def file_tensors(self):
        tensors = {"mixlora_router": self.mixlora_router}
        for name in self.layout.projections:
            tensors[f"mixlora_A_{name}"] = self.mixlora_A[name]
            tensors[f"mixlora_B_{name}"] = self.mixlora_B[name]
        return tensors

    def parameter_roles(self):
        return {"lora_A": list(self.mixlora_A.values()), "lora_B": list(self.mixlora_B.values()),
                "router": [self.mixlora_router]}


def _combine(activation: nn.Module, inputs: list[torch.Tensor]) -> torch.Tensor:
    """act(gate) ⊙ up for a gated FFN, act(fc) for a plain one."""
    if len(inputs) == 2:
        return activation(inputs[0]) * inputs[1]
    return activation(inputs[0])


class LoadBalancing(TrainingHooks):
    """aux_loss_weight · (mean over blocks of E · Σ_e f_e P_e), from each block's last forward pass."""

    def __init__(self, adapter_name: str, weight: float):
        self.adapter_name = adapter_name
        self.weight = weight

    def extra_loss(self, model):
        from tuneforge.adapters.model import wrapped_layers

        losses = [loss for _, layer in wrapped_layers(model) if self.adapter_name in layer.adapters
                  and hasattr(layer.adapters[self.adapter_name], "load_balancing_loss")
                  and (loss := layer.adapters[self.adapter_name].load_balancing_loss()) is not None]
        return self.weight * torch.stack(losses).mean() if losses else None


def mixlora_hooks(model: nn.Module, adapter_name: str, config: MixLoraConfig) -> TrainingHooks | None:
    return LoadBalancing(adapter_name, config.aux_loss_weight) if config.aux_loss_weight > 0 else None


def build_mixlora(base_layer: nn.Module, config: MixLoraConfig, module_name: str) -> LayerAdapter:
    return MixLoraBlock(base_layer, ffn_layout(base_layer, module_name), config, module_name)
