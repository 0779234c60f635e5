"""Compose off-the-shelf LoRA adapters into one, and search the mixing weights (LoraHub, Huang et al. 2023).

Given LoRAs trained on other tasks and a handful of examples of a new task, LoraHub looks for
weights w that make the composition Σ_i w_i ΔW_i do well on the examples, without gradients:

    minimise  L(w) = mean few-shot loss of the model with Σ_i w_i ΔW_i  +  l1 · Σ_i |w_i|
    over      w ∈ [low, high]^n

The composition itself is ``tuneforge.merge``'s (default ``cat``: the exact weighted sum, at rank
Σ r_i); this module only adds it to a model and searches w. The search is a small (1 + λ)
evolution strategy with a step size that grows after a success and shrinks after a failure (the
1/5-rule family; LoraHub uses CMA-ES from nevergrad). It starts from the uniform weights 1/n and
keeps the best point seen, so it never ends worse than uniform on the examples it was given.

``add_lora_router`` is the per-token alternative: learned gating over LoRAs that are already trained,
which is MoLE's setting (Wu et al. 2024, "Mixture of LoRA Experts"). The LoRAs become the fixed experts
of a ``mole`` adapter (``adapters.mole``) and only its routers train, so each token picks the LoRAs it
needs. The gate is MeteoRA's (Xu et al. 2024): a top-k softmax router in every adapted projection,
where MoLE's is a dense softmax over all of a layer's LoRAs. Training new LoRA experts together with a
router is a different method, MixLoRA (``adapters.mixlora``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from tuneforge.adapters.config import LoraConfig
from tuneforge.adapters.model import add_adapter, set_trainable_adapter, wrapped_layers
from tuneforge.adapters.mixtures.mole import MoleConfig
from tuneforge.adapters.peft_format import fill_adapter_weights
from tuneforge.errors import AdapterError, ConfigError
from tuneforge.losses import token_loss_sum
from tuneforge.merge.combine import as_lora, combine_loras
from tuneforge.merge.loras import LoraAdapter, lora_config_for, lora_state

Batch = dict[str, torch.Tensor]
LossFn = Callable[[nn.Module, Batch], torch.Tensor]


def compose_loras(model: nn.Module, adapter_dirs: Sequence[str | Path | LoraAdapter], weights: Sequence[float],
                  name: str = "composed", *, method: str = "cat", activate: bool = True) -> LoraConfig:
    """Add Σ_i weights[i] · ΔW_i of the given LoRA adapters to ``model`` as one LoRA adapter ``name``.

    ``method`` is any of ``tuneforge.merge.COMBINE_METHODS`` (``cat`` is exact; ``linear`` mixes the
    factors and is cheaper but approximate). The new adapter is frozen (for evaluation or serving).
    """
    combined = combine_loras(list(adapter_dirs), list(weights), method)
    config = lora_config_for(combined)
    add_adapter(model, config, name, activate=activate)
    fill_adapter_weights(model, name, lora_state(combined), Path(f"<composition '{name}'>"))
    set_trainable_adapter(model, None)
    return config


@dataclass
class WeightSearch:
    weights: list[float]
    loss: float  # objective (few-shot loss + L1 penalty) at ``weights``
    uniform_loss: float  # objective at the uniform starting point 1/n
    history: list[float] = field(default_factory=list)  # best objective after each generation


def search_lora_weights(model: nn.Module, adapter_dirs: Sequence[str | Path | LoraAdapter], batches: Sequence[Batch],
                        steps: int = 20, seed: int = 0, *, population: int = 6, l1: float = 0.05,
                        bounds: tuple[float, float] = (-1.5, 1.5), step_size: float = 0.5,
                        loss_fn: LossFn | None = None, name: str = "composed") -> WeightSearch:
    """Gradient-free search of the composition weights on a few examples (LoraHub).

    ``batches``: dicts with ``input_ids`` and ``labels`` (``-100`` = not scored), optionally
    ``attention_mask``. ``steps`` generations of ``population`` candidates each. The model keeps the
    composed adapter ``name`` at the best weights found, active and frozen.
    """
    _check_search(adapter_dirs, batches, steps, population, bounds, step_size, l1)
    loras = [as_lora(source) for source in adapter_dirs]
    count = len(loras)
    compose_loras(model, loras, [1.0 / count] * count, name)
    loss_fn = loss_fn or mean_token_loss
    low, high = bounds

    def objective(weights: np.ndarray) -> float:
        combined = combine_loras(loras, [float(w) for w in weights], "cat")
        fill_adapter_weights(model, name, lora_state(combined), Path(f"<composition '{name}'>"))
        with torch.no_grad():
            loss = sum(float(loss_fn(model, batch)) for batch in batches) / len(batches)
        return loss + l1 * float(np.abs(weights).sum())

    rng = np.random.default_rng(seed)
    best = np.full(count, 1.0 / count)
    best_loss = uniform_loss = objective(best)
    sigma, history = step_size, []
    for _ in range(steps):
        candidates = np.clip(best + sigma * rng.standard_normal((population, count)), low, high)
        losses = [objective(candidate) for candidate in candidates]
        winner = int(np.argmin(losses))
        if losses[winner] < best_loss:
            best, best_loss = candidates[winner], losses[winner]
            sigma = min(sigma * 1.5, high - low)
        else:
            sigma *= 0.7
        history.append(best_loss)
    objective(best)  # leave the model at the best weights
    return WeightSearch([float(w) for w in best], best_loss, uniform_loss, history)


def mean_token_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    """Mean next-token cross-entropy over the labelled positions of one batch."""
    total, count = token_loss_sum(model, batch)
    return total / max(1, count)


def _check_search(adapter_dirs, batches, steps, population, bounds, step_size, l1) -> None:
    problems = []
    if len(adapter_dirs) < 1:
        problems.append("adapter_dirs is empty: give at least one LoRA adapter")
    if not batches:
        problems.append("batches is empty: the search needs a few labelled examples")
    elif any("input_ids" not in b or "labels" not in b for b in batches):
        problems.append("every batch needs 'input_ids' and 'labels'")
    if steps < 0 or population < 1:
        problems.append(f"steps={steps} must be >= 0 and population={population} >= 1")
    if not bounds[0] < bounds[1]:
        problems.append(f"bounds={bounds} must be (low, high) with low < high")
    if step_size <= 0 or l1 < 0:
        problems.append(f"step_size={step_size} must be > 0 and l1={l1} >= 0")
    if problems:
        raise ConfigError("cannot search LoRA weights:\n" + "\n".join(f"  - {p}" for p in problems))



def add_lora_router(model: nn.Module, adapter_dirs: Sequence[str | Path | LoraAdapter], name: str = "router", *,
                    top_k: int = 1, aux_loss_weight: float = 0.01) -> MoleConfig:
    """Add a router adapter ``name`` (MoLE-style gating, ``method: mole``) whose experts are the given,
    already-trained LoRAs (fixed) and whose top-k routers train.

    The LoRAs must adapt the same modules of this model; ranks may differ (smaller ones are padded
    with zeros) and each LoRA's scaling is folded into its B. The adapter is left trainable.
    """
    loras = [as_lora(source) for source in adapter_dirs]
    modules = _shared_modules(loras)
    rank = max(m.rank for lora in loras for m in lora.modules.values())
    config = MoleConfig(num_experts=len(loras), top_k=top_k, r=rank, alpha=float(rank), target_modules=modules,
                        aux_loss_weight=aux_loss_weight, train_experts=False)
    add_adapter(model, config, name)
    for layer_name, layer in wrapped_layers(model):
        if name in layer.adapters:
            _fill_experts(layer.adapters[name], [lora.modules[layer_name] for lora in loras], layer_name)
    return config


def _shared_modules(loras: list[LoraAdapter]) -> list[str]:
    if not loras:
        raise ConfigError("adapter_dirs is empty: give the LoRA adapters to route between")
    modules = list(loras[0].modules)
    for lora in loras[1:]:
        if set(lora.modules) != set(modules):
            differ = sorted(set(lora.modules) ^ set(modules))
            raise AdapterError(
                f"the LoRAs to route between must adapt the same modules; {lora.source} and {loras[0].source} "
                f"differ in {', '.join(differ[:3])}{' ...' if len(differ) > 3 else ''}"
            )
    if any(m.embedding for lora in loras for m in lora.modules.values()):
        raise AdapterError("routing between LoRAs supports Linear/Conv1D modules only, not embeddings")
    return modules


def _fill_experts(adapter, experts, layer_name: str) -> None:
    out_features, in_features = adapter.mole_B.shape[1], adapter.mole_A.shape[2]
    with torch.no_grad():
        adapter.mole_A.zero_()
        adapter.mole_B.zero_()
        for index, expert in enumerate(experts):
            if expert.shape != (out_features, in_features):
                raise AdapterError(
                    f"LoRA module '{layer_name}' has shape {expert.shape[0]}x{expert.shape[1]} but the model's layer "
                    f"is {out_features}x{in_features}: the LoRA was made for a different base model"
                )
            adapter.mole_A[index, : expert.rank] = expert.A.float()
            adapter.mole_B[index, :, : expert.rank] = expert.B.float() * expert.scaling
