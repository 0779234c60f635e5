"""AdaLoRA (Zhang et al. 2023, "Adaptive Budget Allocation for Parameter-Efficient Fine-Tuning",
ICLR 2023, arXiv:2303.10512).

Each adapted layer learns its update in SVD form::

    ΔW = s · P Λ Q        P: (out, r) left vectors, Λ: r singular values, Q: (r, in) right vectors

with Λ = 0 at init (identity) and s = alpha / init_r. During training a budget of kept triplets
(P[:, i], λ_i, Q[i, :]) shrinks from ``init_r`` per layer to ``target_r`` per layer on a cubic schedule;
at each allocation step the globally least important triplets get λ_i = 0 (paper Algorithm 1). A
triplet's importance is the smoothed sensitivity times its uncertainty (paper eqs. 5-7), summed over
λ_i and the means over its vector entries (eq. 8).

An orthogonality regulariser keeps P and Q close to orthonormal. The paper (eq. 4) writes
R(P, Q) = ‖PᵀP − I‖²_F + ‖QQᵀ − I‖²_F summed over layers; the official code and peft (whose
``AdaLoraModel.forward`` we follow) add instead ``orth_reg_weight`` times the *mean* over all 2L
matrices of the *unsquared* norms ‖PᵀP − I‖_F and ‖QQᵀ − I‖_F, which is far weaker. Importance is
read from the task loss's gradient only: peft and the official code take ``p.grad`` after the
backward of loss + regulariser, so a triplet far from orthonormal would look important; the paper
defines sensitivity on the training loss, and we remove the regulariser's gradient before scoring.
(With gradient clipping, what is removed is the unclipped regulariser gradient, an approximation.)

File format: PEFT's ADALORA layout (``lora_A`` = Q, ``lora_B`` = P, ``lora_E`` = Λ as (r, 1), no
``.weight`` suffix; ``ranknum`` is not stored). PEFT saves a trained adapter pruned to the kept triplets
plus a ``rank_pattern``; tuneforge reads both layouts, and writes the unpruned tensors (pruned triplets
have λ = 0 exactly), which PEFT loads with identical outputs and a checkpoint can resume from.
"""

from __future__ import annotations

import warnings
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from tuneforge.adapters.config import AdapterConfig
from tuneforge.adapters.hooks import TrainingHooks
from tuneforge.adapters.layer import LayerAdapter
from tuneforge.adapters.lora.lora import check_rank, is_transposed, refuse_quantized_merge, weight_shape
from tuneforge.errors import AdapterError, ConfigError

# Keys PEFT's AdaLoraConfig inherits from its LoraConfig; at these values they change nothing here.
_INERT_PEFT_KEYS = {"r": 8, "init_lora_weights": True, "bias": "none"}


class AdaLoraConfig(AdapterConfig):
    """AdaLoRA settings; names follow PEFT's ``AdaLoraConfig`` (``deltaT`` is ``delta_t`` here).

    total_step: the run's optimizer steps. The training loop knows them, so leave it unset; the
        schedule then follows the loop and the value is recorded in the saved adapter (PEFT needs it).
    rank_pattern: which triplets a PEFT-trained adapter kept, per ``<module>.lora_E`` (read from PEFT
        files; tuneforge writes unpruned tensors and no pattern).
    """

    method: Literal["adalora"] = "adalora"
    init_r: int = Field(12, gt=0, description="triplets per layer at the start")
    target_r: int = Field(8, gt=0, description="average triplets per layer at the end")
    alpha: float = Field(32.0, gt=0)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    tinit: int = Field(0, ge=0, description="warm-up steps before the budget starts to shrink")
    tfinal: int = Field(0, ge=0, description="final steps trained at the target budget with a fixed mask")
    delta_t: int = Field(1, gt=0, description="steps between two budget allocations")
    beta1: float = Field(0.85, gt=0.0, lt=1.0, description="EMA factor of the sensitivity")
    beta2: float = Field(0.85, gt=0.0, lt=1.0, description="EMA factor of the uncertainty")
    orth_reg_weight: float = Field(0.5, ge=0.0)
    total_step: int | None = Field(None, gt=0)
    rank_pattern: dict[str, list[bool]] | None = None
    fan_in_fan_out: bool = False  # PEFT's flag for GPT-2's Conv1D; the layout is detected from the layer

    peft_type: ClassVar[str] = "ADALORA"
    peft_field_names: ClassVar[dict[str, str]] = {
        "alpha": "lora_alpha", "dropout": "lora_dropout", "delta_t": "deltaT",
    }

    @model_validator(mode="after")
    def _possible_budget(self) -> "AdaLoraConfig":
        if self.target_r > self.init_r:
            raise ValueError(
                f"target_r={self.target_r} is larger than init_r={self.init_r}: AdaLoRA only removes triplets, "
                "so start with init_r >= target_r (e.g. init_r=12, target_r=8)"
            )
        if self.total_step is not None:
            check_budget_schedule(self.tinit, self.tfinal, self.total_step)
        return self

    def to_peft_dict(self) -> dict[str, Any]:
        data = super().to_peft_dict()
        data["rank_pattern"] = None  # tensors are written unpruned (see the module docstring)
        return data

    @classmethod
    def from_peft_dict(cls, data: dict[str, Any], source: str = "adapter_config.json") -> "AdapterConfig":
        data = {k: v for k, v in data.items() if not (k in _INERT_PEFT_KEYS and v == _INERT_PEFT_KEYS[k])}
        return super().from_peft_dict(data, source)


def check_budget_schedule(tinit: int, tfinal: int, total_steps: int) -> None:
    if tinit + tfinal >= total_steps:
        raise ConfigError(
            f"AdaLoRA: impossible budget schedule: tinit={tinit} + tfinal={tfinal} >= {total_steps} total steps, "
            "so no step is left to shrink the rank budget. Lower adapter.tinit / adapter.tfinal or train longer."
        )


def budget_at(step: int, *, initial: int, target: int, tinit: int, tfinal: int, total_steps: int) -> int:
    """Triplets kept after ``step`` (0-based): constant, then a cubic decrease, then the target (paper eq. 9).

    The last step always lands on the target, so a run with ``tfinal=0`` still ends at the target budget.
    """
    decrease_end = total_steps - tfinal
    if step < tinit:
        return initial
    if step >= decrease_end or step == total_steps - 1:
        return target
    remaining = 1 - (step - tinit) / (decrease_end - tinit)
    return int(target + (initial - target) * remaining ** 3)


class AdaLoraLinear(LayerAdapter):
    """SVD-form update on a Linear or Conv1D layer; ``rank_mask`` marks the triplets in the budget."""

    def __init__(self, in_features: int, out_features: int, init_r: int, alpha: float, dropout: float,
                 transposed: bool, kept: list[bool] | None = None):
        super().__init__()
        self.init_r = init_r
        self.scaling = alpha / init_r
        self.transposed = transposed
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        # Paper §3.1: Λ starts at zero (identity), P and Q Gaussian.
        self.lora_A = nn.Parameter(torch.randn(init_r, in_features) * 0.02)  # Q: (r, in)
        self.lora_E = nn.Parameter(torch.zeros(init_r, 1))  # Λ: (r, 1)
        self.lora_B = nn.Parameter(torch.randn(out_features, init_r) * 0.02)  # P: (out, r)
        mask = torch.ones(init_r, dtype=torch.bool) if kept is None else torch.tensor(kept, dtype=torch.bool)
        self.register_buffer("rank_mask", mask)

    def transform_output(self, x, out, base_layer):
        x = self.dropout(x).to(self.lora_A.dtype)
        coefficients = F.linear(x, self.lora_A) * self.lora_E.view(-1)  # (..., r)
        return out + (F.linear(coefficients, self.lora_B) * self.scaling).to(out.dtype)

    def delta_weight(self, base_layer) -> torch.Tensor:
        delta = self.lora_B @ (self.lora_A * self.lora_E) * self.scaling  # (out, in)
        return delta.T if self.transposed else delta

    def merge(self, base_layer, safe):
        refuse_quantized_merge(base_layer)
        super().merge(base_layer, safe)

    def apply_mask(self, kept: torch.Tensor) -> None:
        """Keep the triplets in ``kept`` (bool, (r,)); the others get λ = 0 but keep training."""
        self.rank_mask.copy_(kept)
        with torch.no_grad():
            self.lora_E.masked_fill_(~kept.view(-1, 1).to(self.lora_E.device), 0.0)

    def file_tensors(self):
        return {"lora_A": self.lora_A, "lora_B": self.lora_B, "lora_E": self.lora_E}

    def load_file_tensors(self, tensors, where):
        kept_rows = int(self.rank_mask.sum())
        if kept_rows < self.init_r and all(k in tensors for k in ("lora_A", "lora_B", "lora_E")) \
                and tensors["lora_E"].shape[0] == kept_rows:
            tensors = self._unpruned(tensors)
        super().load_file_tensors(tensors, where)

    def _unpruned(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Scatter PEFT's pruned tensors (kept triplets only) back to ``init_r`` slots, λ = 0 elsewhere."""
        kept = self.rank_mask.cpu()
        full_a = torch.zeros_like(self.lora_A, device="cpu")
        full_b = torch.zeros_like(self.lora_B, device="cpu")
        full_e = torch.zeros_like(self.lora_E, device="cpu")
        full_a[kept] = tensors["lora_A"].to(full_a.dtype)
        full_b[:, kept] = tensors["lora_B"].to(full_b.dtype)
        full_e[kept] = tensors["lora_E"].to(full_e.dtype)
        return {"lora_A": full_a, "lora_B": full_b, "lora_E": full_e}

    def triplet_parameters(self) -> dict[str, nn.Parameter]:
        return {"lora_A": self.lora_A, "lora_E": self.lora_E, "lora_B": self.lora_B}

    def parameter_roles(self):
        # One role: LoRA+'s faster B does not carry over to P of an SVD-form update.
        return {"svd_triplets": [self.lora_A, self.lora_E, self.lora_B]}


def build_adalora(base_layer: nn.Module, config: AdaLoraConfig, module_name: str) -> LayerAdapter:
    in_features, out_features = weight_shape(base_layer)
    check_rank(config.init_r, in_features, out_features, module_name)
    kept = (config.rank_pattern or {}).get(f"{module_name}.lora_E")
    if kept is not None and len(kept) != config.init_r:
        raise AdapterError(
            f"rank_pattern['{module_name}.lora_E'] has {len(kept)} entries but init_r={config.init_r}; "
            "the adapter_config.json does not belong to these tensors"
        )
    return AdaLoraLinear(in_features, out_features, config.init_r, config.alpha, config.dropout,
                         is_transposed(base_layer), kept)


def orthogonality_distances(adapter: AdaLoraLinear) -> list[torch.Tensor]:
    """[‖PᵀP − I‖_F, ‖QQᵀ − I‖_F] for one layer (unsquared, as the reference code)."""
    p, q = adapter.lora_B, adapter.lora_A
    eye = torch.eye(adapter.init_r, device=p.device, dtype=p.dtype)
    return [torch.linalg.matrix_norm(p.T @ p - eye), torch.linalg.matrix_norm(q @ q.T - eye)]


def orthogonality_penalty(adapters: list[AdaLoraLinear]) -> torch.Tensor:
    """Mean over all P and Q matrices of their distance to orthonormal (peft's AdaLoraModel.forward)."""
    distances = [d for adapter in adapters for d in orthogonality_distances(adapter)]
    return torch.stack(distances).mean()


class AdaLoraAllocator(TrainingHooks):
    """Importance tracking, budget schedule and masking for one AdaLoRA adapter (paper Algorithm 1).

    Before each optimizer step (gradients present) the sensitivity |w · ∂L/∂w| of every entry updates
    two EMAs; after the step, allocation steps keep the ``budget_at(step)`` most important triplets
    over all layers. From ``total_steps - tfinal`` on the last mask is fixed and re-applied every step.
    """

    def __init__(self, model: nn.Module, adapter_name: str, config: AdaLoraConfig):
        self.model = model
        self.adapter_name = adapter_name
        self.config = config
        self.sensitivity: dict[str, torch.Tensor] = {}  # "<layer>.<param>" -> smoothed sensitivity Ī
        self.uncertainty: dict[str, torch.Tensor] = {}  # "<layer>.<param>" -> uncertainty Ū
        self.budgets: list[tuple[int, int]] = []  # (step, kept triplets) at each allocation

    def layers(self) -> list[tuple[str, AdaLoraLinear]]:
        from tuneforge.adapters.model import wrapped_layers

        return [(name, layer.adapters[self.adapter_name]) for name, layer in wrapped_layers(self.model)
                if self.adapter_name in layer.adapters]

    def extra_loss(self, model):
        adapters = [adapter for _, adapter in self.layers()]
        if self.config.orth_reg_weight == 0 or not adapters:
            return None
        return self.config.orth_reg_weight * orthogonality_penalty(adapters)

    def before_optimizer_step(self, model, step, total_steps):
        total_steps = self._checked_total(total_steps)
        if step < total_steps - self.config.tfinal:
            self.update_importance(self.regulariser_gradients())

    def regulariser_gradients(self) -> dict[str, torch.Tensor]:
        """"<layer>.<param>" -> the regulariser's share of that parameter's accumulated gradient.

        The loop adds ``extra_loss`` once per step in total (1/n per micro-batch), so its gradient is
        that of one regulariser evaluated at the current weights.
        """
        with torch.enable_grad():
            penalty = self.extra_loss(self.model)
            if penalty is None:
                return {}
            keyed = [(f"{layer_name}.{name}", param) for layer_name, adapter in self.layers()
                     for name, param in adapter.triplet_parameters().items()]
            grads = torch.autograd.grad(penalty, [param for _, param in keyed], allow_unused=True)
        return {key: grad for (key, _), grad in zip(keyed, grads) if grad is not None}

    def after_optimizer_step(self, model, step, total_steps):
        total_steps = self._checked_total(total_steps)
        decrease_end = total_steps - self.config.tfinal
        if step < self.config.tinit:
            return
        if step > decrease_end:
            self._reapply_masks()  # final phase: the mask is fixed, λ of pruned triplets stays 0
            return
        due = (step - self.config.tinit) % self.config.delta_t == 0
        if due or step == decrease_end or step == total_steps - 1:
            budget = budget_at(step, initial=self.initial_budget(), target=self.target_budget(),
                               tinit=self.config.tinit, tfinal=self.config.tfinal, total_steps=total_steps)
            self.allocate(budget)
            self.budgets.append((step, budget))

    def initial_budget(self) -> int:
        return self.config.init_r * len(self.layers())

    def target_budget(self) -> int:
        return self.config.target_r * len(self.layers())

    def _checked_total(self, total_steps: int) -> int:
        configured = self.config.total_step
        if configured is not None and configured != total_steps:
            warnings.warn(
                f"AdaLoRA: adapter.total_step={configured} but this run takes {total_steps} optimizer steps; "
                f"the rank budget follows the run ({total_steps} steps). Remove adapter.total_step to silence this.",
                stacklevel=3,
            )
        if configured != total_steps:
            check_budget_schedule(self.config.tinit, self.config.tfinal, total_steps)
            self.config.total_step = total_steps  # recorded in the saved adapter (PEFT requires it)
        return total_steps

    def update_importance(self, regulariser_grads: dict[str, torch.Tensor] | None = None) -> None:
        """Update Ī and Ū from ``param.grad`` less the regulariser's part (``regulariser_grads``)."""
        beta1, beta2 = self.config.beta1, self.config.beta2
        regulariser_grads = regulariser_grads or {}
        with torch.no_grad():
            for layer_name, adapter in self.layers():
                for param_name, param in adapter.triplet_parameters().items():
                    key = f"{layer_name}.{param_name}"
                    grad = param.grad if param.grad is not None else torch.zeros_like(param)
                    if key in regulariser_grads:
                        grad = grad - regulariser_grads[key]  # the task loss's gradient alone
                    sensitivity = (param * grad).abs().float()
                    smoothed = self.sensitivity.get(key, torch.zeros_like(sensitivity))
                    smoothed = beta1 * smoothed + (1 - beta1) * sensitivity
                    spread = self.uncertainty.get(key, torch.zeros_like(sensitivity))
                    self.uncertainty[key] = beta2 * spread + (1 - beta2) * (sensitivity - smoothed).abs()
                    self.sensitivity[key] = smoothed

    def triplet_scores(self) -> dict[str, torch.Tensor]:
        """Per layer, (r,) importance of each triplet: s(λ_i) + mean_j s(Q_ij) + mean_k s(P_ki) (paper eq. 8)."""
        scores = {}
        for layer_name, adapter in self.layers():
            element = {name: self._element_scores(f"{layer_name}.{name}", param)
                       for name, param in adapter.triplet_parameters().items()}
            scores[layer_name] = element["lora_E"].view(-1) + element["lora_A"].mean(dim=1) + element["lora_B"].mean(dim=0)
        return scores

    def _element_scores(self, key: str, param: torch.Tensor) -> torch.Tensor:
        """s(w) = Ī(w) · Ū(w) (paper eq. 7); zero before the first importance update."""
        if key not in self.sensitivity:
            return torch.zeros_like(param, dtype=torch.float32)
        return self.sensitivity[key] * self.uncertainty[key]

    def allocate(self, budget: int) -> None:
        """Keep the ``budget`` most important triplets over all layers; λ = 0 for the others."""
        scores = self.triplet_scores()
        names = list(scores)
        flat = torch.cat([scores[name].cpu() for name in names])
        kept = torch.zeros_like(flat, dtype=torch.bool)
        kept[torch.topk(flat, k=min(budget, flat.numel())).indices] = True
        adapters = dict(self.layers())
        for name, layer_kept in zip(names, kept.split([scores[n].numel() for n in names])):
            adapters[name].apply_mask(layer_kept)

    def _reapply_masks(self) -> None:
        for _, adapter in self.layers():
            adapter.apply_mask(adapter.rank_mask.clone())

    def kept_triplets(self) -> int:
        return sum(int(adapter.rank_mask.sum()) for _, adapter in self.layers())

    def state_dict(self):
        return {
            "sensitivity": dict(self.sensitivity),
            "uncertainty": dict(self.uncertainty),
            "budgets": list(self.budgets),
            "masks": {name: adapter.rank_mask.clone() for name, adapter in self.layers()},
        }

    def load_state_dict(self, state):
        self.sensitivity = dict(state.get("sensitivity", {}))
        self.uncertainty = dict(state.get("uncertainty", {}))
        self.budgets = [tuple(b) for b in state.get("budgets", [])]
        masks = state.get("masks", {})
        for name, adapter in self.layers():
            if name in masks:
                adapter.rank_mask.copy_(masks[name])


def adalora_hooks(model: nn.Module, adapter_name: str, config: AdaLoraConfig) -> AdaLoraAllocator:
    return AdaLoraAllocator(model, adapter_name, config)
