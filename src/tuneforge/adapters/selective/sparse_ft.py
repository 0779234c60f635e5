"""Diff pruning (Guo, Rush and Kim 2021, "Parameter-Efficient Transfer Learning with Diff Pruning",
ACL 2021, arXiv:2012.07463).

Each target layer learns a diff δ added to its frozen weight, ``h = (W + δ) x + b``. With
``selection: hard-concrete`` (the paper's method) δ = z ⊙ w, where w is a dense trainable diff and z
a hard-concrete gate per entry (Louizos et al. 2018) with trainable log-odds α (the paper's §3.2)::

    u ~ U(0, 1)
    s = σ(log u − log(1 − u) + α)          s̄ = s · (r − l) + l          z = min(1, max(0, s̄))

and the loss gets the expected L0 norm of δ (the probability that each gate is non-zero)::

    λ · Σ_entries σ(α − log(−l / r))

In evaluation, and when merging, the gate is its deterministic value min(1, max(0, σ(α)(r − l) + l)).
Constants follow the official code: l = −1.5, r = 1.5 (so the penalty is λ Σ σ(α)), α starts at 5 (every
gate open), λ = 1.25e-7 per entry, and α has its own Adam optimizer at lr 0.1 (``gate_lr``), stepped by
the training hook; the code samples s without a temperature, as the paper's equation does. The paper's
structured variant (one extra gate per group of entries) is not implemented.

After the first part of the run, δ is projected onto the L0 ball (§3.3): its ``target_density``
fraction of largest-magnitude entries are kept (with ``target_density: null``, the entries whose gate
stayed open), the gate is folded into w, and the remaining ``retrain_fraction`` of the steps trains
the kept entries with the mask fixed and no penalty, as the paper finetunes after the projection
(how many steps go to each phase is our setting, not the paper's).

``selection: magnitude-projection`` is the simpler non-adaptive baseline: a dense δ = w trains, is
projected to its largest entries by magnitude at the same point, and the kept entries retrain on the
fixed mask.

The file holds the non-zero entries of δ as flat indices into the base weight's own layout plus their
values (``sparse_indices``, ``sparse_values``); an adapter saved before the projection (a mid-run
checkpoint) also holds the gates' α (``diff_log_alpha``), so training resumes where it was.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from tuneforge.adapters.config import AdapterConfig
from tuneforge.adapters.hooks import TrainingHooks
from tuneforge.adapters.layer import LayerAdapter
from tuneforge.adapters.selective.layer_selective import apply_weight
from tuneforge.adapters.lora.lora import is_transposed, refuse_quantized_merge
from tuneforge.errors import AdapterError


class SparseFTConfig(AdapterConfig):
    """Diff pruning: a sparse δ on each target weight.

    selection: ``hard-concrete`` (the paper's L0-relaxed gates) or ``magnitude-projection`` (dense δ,
        pruned by magnitude). Both project onto ``target_density`` and retrain on the fixed mask.
    target_density: fraction of each target weight that may differ from the base after training
        (hard-concrete only: null keeps every entry whose gate is open).
    retrain_fraction: last fraction of the training steps spent retraining the kept entries.
    l0_penalty, gate_lr, gate_init, stretch_lower, stretch_upper: λ, α's learning rate, α's initial
        value and the stretch interval (l, r) of the hard-concrete gates.
    """

    method: Literal["sparse-ft"] = "sparse-ft"
    selection: Literal["hard-concrete", "magnitude-projection"] = "hard-concrete"
    target_density: float | None = Field(0.01, gt=0.0, le=1.0)
    retrain_fraction: float = Field(0.2, ge=0.0, lt=1.0)
    l0_penalty: float = Field(1.25e-7, ge=0.0)
    gate_lr: float = Field(0.1, gt=0.0)
    gate_init: float = 5.0
    stretch_lower: float = Field(-1.5, lt=0.0)
    stretch_upper: float = Field(1.5, gt=1.0)

    @model_validator(mode="after")
    def _density_for_magnitude(self):
        if self.selection == "magnitude-projection" and self.target_density is None:
            raise ValueError("selection: magnitude-projection needs a target_density (the fraction of entries to keep)")
        return self


def hard_concrete_sample(log_alpha: torch.Tensor, uniform: torch.Tensor, lower: float, upper: float) -> torch.Tensor:
    """z = min(1, max(0, σ(log u − log(1 − u) + α) · (r − l) + l)) for u = ``uniform`` in (0, 1)."""
    stretched = torch.sigmoid(uniform.log() - (-uniform).log1p() + log_alpha) * (upper - lower) + lower
    return stretched.clamp(0.0, 1.0)


def hard_concrete_mean_gate(log_alpha: torch.Tensor, lower: float, upper: float) -> torch.Tensor:
    """The deterministic gate used in evaluation: min(1, max(0, σ(α) · (r − l) + l))."""
    return (torch.sigmoid(log_alpha) * (upper - lower) + lower).clamp(0.0, 1.0)


def expected_l0(log_alpha: torch.Tensor, lower: float, upper: float) -> torch.Tensor:
    """Σ P(z ≠ 0) = Σ σ(α − log(−l / r)): the expected number of non-zero entries of δ."""
    return torch.sigmoid(log_alpha - math.log(-lower / upper)).sum()


class DiffPruningDelta(LayerAdapter):
    """δ = z ⊙ w (gated), w (dense, before a magnitude projection) or mask ⊙ w (after the projection)."""

    def __init__(self, weight_shape: torch.Size, in_out_layout: bool, config: SparseFTConfig):
        super().__init__()
        # (in, out) storage as in GPT-2's Conv1D; not named "transposed", which save_adapter reads as
        # PEFT's fan_in_fan_out flag, absent from this non-PEFT format.
        self.in_out_layout = in_out_layout
        self.lower, self.upper = config.stretch_lower, config.stretch_upper
        self.target_density = config.target_density
        self.delta = nn.Parameter(torch.zeros(weight_shape))  # w, in the base weight's layout
        self.gate_log_alpha = None
        if config.selection == "hard-concrete":
            self.gate_log_alpha = nn.Parameter(torch.full(weight_shape, float(config.gate_init)))  # α
        self.register_buffer("mask", None)  # set by the projection: the entries δ may use

    @property
    def gated(self) -> bool:
        return self.gate_log_alpha is not None

    @property
    def projected(self) -> bool:
        return self.mask is not None

    def gate(self) -> torch.Tensor:
        """A fresh sample of z while training, the deterministic gate otherwise."""
        if self.training and torch.is_grad_enabled():
            uniform = torch.rand_like(self.gate_log_alpha).clamp(1e-6, 1 - 1e-6)
            return hard_concrete_sample(self.gate_log_alpha, uniform, self.lower, self.upper)
        return hard_concrete_mean_gate(self.gate_log_alpha, self.lower, self.upper)

    def effective_delta(self) -> torch.Tensor:
        if self.projected:
            return self.delta * self.mask
        if self.gated:
            return self.delta * self.gate()
        return self.delta

    def transform_output(self, x, out, base_layer):
        delta = self.effective_delta()
        return out + apply_weight(x.to(delta.dtype), delta, self.in_out_layout).to(out.dtype)

    def delta_weight(self, base_layer):
        if self.gated and not self.projected:  # merging uses the deterministic gate, never a sample
            return self.delta * hard_concrete_mean_gate(self.gate_log_alpha, self.lower, self.upper)
        return self.effective_delta()

    def merge(self, base_layer, safe):
        refuse_quantized_merge(base_layer)
        super().merge(base_layer, safe)

    def expected_l0(self) -> torch.Tensor | None:
        if not self.gated or self.projected:
            return None
        return expected_l0(self.gate_log_alpha, self.lower, self.upper)

    @torch.no_grad()
    def project(self) -> None:
        """Fix the mask: the ``target_density`` largest-magnitude entries of δ (those with an open gate when
        no density is set); the deterministic gate is folded into w and the gates are dropped."""
        current = self.delta_weight(None).detach()
        candidates = current != 0
        if self.projected:
            candidates &= self.mask.bool()
        if self.target_density is not None:
            keep = max(1, round(self.target_density * current.numel()))
            if int(candidates.sum()) > keep:
                kept = current.abs().view(-1).topk(keep, sorted=False).indices
                candidates = torch.zeros_like(candidates).view(-1).index_fill_(0, kept, True).view_as(current)
        self.delta.copy_(current * candidates)
        self.mask = candidates.to(self.delta.dtype)
        self.gate_log_alpha = None  # no longer used: the mask is fixed from here on

    def file_tensors(self):
        saved = self.effective_delta() if self.projected else self.delta
        flat = saved.detach().reshape(-1)
        indices = self.mask.reshape(-1).nonzero().view(-1) if self.projected else flat.nonzero().view(-1)
        tensors = {"sparse_indices": indices, "sparse_values": flat[indices]}
        if self.gated:
            tensors["diff_log_alpha"] = self.gate_log_alpha
        return tensors

    def load_file_tensors(self, tensors, where):
        for key in ("sparse_indices", "sparse_values"):
            if key not in tensors:
                raise AdapterError(f"adapter file has no tensor '{where}.{key}'")
        indices, values = tensors["sparse_indices"].long(), tensors["sparse_values"]
        if indices.shape != values.shape or (indices.numel() and int(indices.max()) >= self.delta.numel()):
            raise AdapterError(
                f"tensors '{where}.sparse_indices/sparse_values' do not fit this layer's weight "
                f"{tuple(self.delta.shape)}: the adapter was made for a different base model"
            )
        log_alpha = tensors.get("diff_log_alpha")
        if log_alpha is not None and log_alpha.shape != self.delta.shape:
            raise AdapterError(f"tensor '{where}.diff_log_alpha' has shape {tuple(log_alpha.shape)}, not the "
                               f"layer's {tuple(self.delta.shape)}: the adapter was made for a different base model")
        with torch.no_grad():
            self.delta.zero_()
            self.delta.view(-1)[indices] = values.to(self.delta.dtype)
            if log_alpha is not None and self.gated:
                self.gate_log_alpha.copy_(log_alpha.to(self.gate_log_alpha.dtype))
                return
        # No gates in the file: a projected adapter, whose mask is the stored entries.
        mask = torch.zeros(self.delta.numel(), dtype=self.delta.dtype, device=self.delta.device)
        mask[indices.to(mask.device)] = 1.0
        self.mask = mask.view_as(self.delta)
        self.gate_log_alpha = None

    def parameter_roles(self):
        # α is stepped by DiffPruningSchedule's own optimizer (lr gate_lr), not the trainer's.
        return {"default": [self.delta]}

    def density(self) -> float:
        return float((self.delta_weight(None) != 0).sum()) / self.delta.numel()


def build_sparse_ft(base_layer: nn.Module, config: SparseFTConfig, module_name: str) -> LayerAdapter:
    if isinstance(base_layer, nn.Embedding):
        raise AdapterError(f"sparse-ft: '{module_name}' is an Embedding; target Linear/Conv1D layers")
    return DiffPruningDelta(base_layer.weight.shape, is_transposed(base_layer), config)


def diff_layers(model: nn.Module, adapter_name: str) -> list[DiffPruningDelta]:
    from tuneforge.adapters.model import wrapped_layers

    found = [dict(layer.adapters).get(adapter_name) for _, layer in wrapped_layers(model)]
    return [adapter for adapter in found if isinstance(adapter, DiffPruningDelta)]


def projection_step(total_steps: int, retrain_fraction: float) -> int:
    """The 1-based step after which δ is projected: the last ``retrain_fraction`` of the run retrains."""
    return max(1, total_steps - round(retrain_fraction * total_steps))


class DiffPruningSchedule(TrainingHooks):
    """The L0 penalty, the gates' own optimizer step, and the projection onto the L0 ball."""

    def __init__(self, adapter_name: str, config: SparseFTConfig):
        self.adapter_name = adapter_name
        self.config = config
        self.gate_optimizer: torch.optim.Optimizer | None = None
        self._pending_state: dict | None = None

    def extra_loss(self, model):
        if self.config.l0_penalty == 0:
            return None
        norms = [norm for adapter in diff_layers(model, self.adapter_name) if (norm := adapter.expected_l0()) is not None]
        return self.config.l0_penalty * torch.stack(norms).sum() if norms else None

    def before_optimizer_step(self, model, step, total_steps):
        gates = [a.gate_log_alpha for a in diff_layers(model, self.adapter_name) if a.gated and not a.projected]
        if not gates:
            return
        if self.gate_optimizer is None:
            self.gate_optimizer = torch.optim.Adam(gates, lr=self.config.gate_lr)
            if self._pending_state:
                self.gate_optimizer.load_state_dict(self._pending_state)
        # As the official code: α's gradient is clipped to norm 1 on its own, then its own Adam steps.
        torch.nn.utils.clip_grad_norm_(gates, 1.0)
        self.gate_optimizer.step()
        self.gate_optimizer.zero_grad(set_to_none=True)

    def after_optimizer_step(self, model, step, total_steps):
        switch = projection_step(total_steps, self.config.retrain_fraction)
        if step + 1 == switch or (step + 1 >= total_steps and not self._all_projected(model)):
            project_adapter(model, self.adapter_name)
            self.gate_optimizer = None

    def _all_projected(self, model) -> bool:
        return all(adapter.projected for adapter in diff_layers(model, self.adapter_name))

    def state_dict(self):
        return {"gate_optimizer": self.gate_optimizer.state_dict()} if self.gate_optimizer is not None else {}

    def load_state_dict(self, state):
        self._pending_state = state.get("gate_optimizer")


def project_adapter(model: nn.Module, adapter_name: str) -> None:
    """Project every layer of a sparse-ft adapter onto its target density and fix the mask (also usable by hand)."""
    for adapter in diff_layers(model, adapter_name):
        adapter.project()


def sparse_ft_hooks(model: nn.Module, adapter_name: str, config: SparseFTConfig) -> TrainingHooks:
    return DiffPruningSchedule(adapter_name, config)
