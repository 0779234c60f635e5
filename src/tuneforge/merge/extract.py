"""Extract a LoRA adapter from a finetuned model: a truncated SVD of each module's weight difference.

For each target module, ΔW = W_finetuned - W_base (out, in) = U S Vᵀ, and the adapter keeps

    B = U_k √S_k,  A = √S_k V_kᵀ,   k = min(max_rank, smallest k with Σ_{i≤k} σ_i² ≥ energy · Σ_i σ_i²)

which is the best rank-k approximation in Frobenius norm (Eckart–Young). The report gives, per
module, k and the achieved relative error ‖ΔW - B A‖_F / ‖ΔW‖_F. Modules whose weights did not
change get no LoRA. Ranks differ per module, so the PEFT config carries them in ``rank_pattern``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Union

import torch
from torch import nn

from tuneforge.adapters.config import TargetSpec
from tuneforge.adapters.layer import AdaptedLayer
from tuneforge.adapters.lora.lora import is_transposed
from tuneforge.adapters.targeting import (
    ALL_LINEAR,
    candidate_modules,
    linear_layer_types,
    name_matches,
    output_head_names,
)
from tuneforge.errors import AdapterError, ConfigError
from tuneforge.merge.loras import LoraAdapter, LoraModule, check_output_dir, factors_from_svd, write_lora

Weights = Union[nn.Module, Mapping[str, torch.Tensor]]


@dataclass(frozen=True)
class ModuleExtraction:
    rank: int
    relative_error: float  # ‖ΔW - B A‖_F / ‖ΔW‖_F
    kept_energy: float  # Σ_{i≤k} σ_i² / Σ_i σ_i²
    shape: tuple[int, int]  # (out, in)


@dataclass
class ExtractionReport:
    output_dir: Path
    modules: dict[str, ModuleExtraction]
    unchanged: list[str] = field(default_factory=list)

    @property
    def max_relative_error(self) -> float:
        return max(m.relative_error for m in self.modules.values())

    def table(self) -> str:
        rows = [f"| {name} | {m.shape[0]}x{m.shape[1]} | {m.rank} | {m.kept_energy:.6f} | {m.relative_error:.3e} |"
                for name, m in self.modules.items()]
        head = "| module | weight | rank | kept energy | relative error |\n|---|---|---|---|---|\n"
        tail = f"\n\nUnchanged (no LoRA): {', '.join(self.unchanged)}" if self.unchanged else ""
        return head + "\n".join(rows) + tail


def extract_lora(base: Weights, finetuned: Weights, output_dir: str | Path, *,
                 target_modules: TargetSpec = ALL_LINEAR, max_rank: int | None = None,
                 energy: float | None = None, overwrite: bool = False) -> ExtractionReport:
    """Write the LoRA adapter that turns ``base`` into (approximately) ``finetuned``; see the module docstring.

    ``base``/``finetuned``: models or state dicts of one architecture. With state dicts the layer
    kinds are unknown, so ``target_modules`` must name the Linear modules (list or regex) and
    their weights are taken as (out, in). ``max_rank`` and/or ``energy`` (in (0, 1]) bound the rank.
    """
    _check_bounds(max_rank, energy)
    check_output_dir(output_dir, overwrite)
    pairs, transposed = _target_weights(base, finetuned, target_modules)
    modules, report, unchanged = {}, {}, []
    for name, (w_base, w_tuned) in pairs.items():
        delta = w_tuned.to(_work_dtype(w_tuned)) - w_base.to(_work_dtype(w_tuned))
        delta = delta.T if transposed else delta  # (out, in)
        norm = torch.linalg.matrix_norm(delta)
        if norm == 0:
            unchanged.append(name)
            continue
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)  # (out, m), (m,), (m, in)
        k = _rank_for(s, max_rank, energy)
        a, b = (f.to(w_tuned.dtype) for f in factors_from_svd(u, s, vh, k))  # stored in the model's dtype
        error = (torch.linalg.matrix_norm(delta - b.to(delta.dtype) @ a.to(delta.dtype)) / norm).item()
        kept = ((s[:k] ** 2).sum() / (s**2).sum()).item()
        modules[name] = LoraModule(a, b, 1.0)
        report[name] = ModuleExtraction(k, error, kept, tuple(delta.shape))
    if not modules:
        raise AdapterError(
            f"the finetuned weights equal the base weights in all {len(pairs)} target modules; nothing to extract"
        )
    adapter = LoraAdapter(modules, fan_in_fan_out=transposed, base_model=_name_of(base), task_type=_task_of(base),
                          source="extracted")
    result = ExtractionReport(Path(output_dir), report, unchanged)
    card = (f"---\nlibrary_name: peft\nbase_model: {adapter.base_model or '(not recorded)'}\n"
            f"tags: [tuneforge, lora, extracted]\n---\n\n# Extracted LoRA adapter\n\n"
            f"Truncated SVD of finetuned - base weights (`tuneforge.merge.extract_lora`, "
            f"max_rank={max_rank}, energy={energy}).\n\n{result.table()}\n")
    write_lora(adapter, output_dir, overwrite=overwrite, card=card)
    return result


def _check_bounds(max_rank, energy) -> None:
    problems = []
    if max_rank is None and energy is None:
        problems.append("give max_rank=<int> and/or energy=<fraction in (0, 1]> to bound the rank")
    if max_rank is not None and (not isinstance(max_rank, int) or max_rank < 1):
        problems.append(f"max_rank={max_rank!r} must be a positive integer")
    if energy is not None and not (isinstance(energy, (int, float)) and 0.0 < energy <= 1.0):
        problems.append(f"energy={energy!r} must be in (0, 1]: the share of ‖ΔW‖² the kept singular values hold")
    if problems:
        raise ConfigError("cannot extract a LoRA:\n" + "\n".join(f"  - {p}" for p in problems))


def _rank_for(s: torch.Tensor, max_rank: int | None, energy: float | None) -> int:
    k = s.shape[0]
    if energy is not None:
        share = (s.double() ** 2).cumsum(0) / (s.double() ** 2).sum()
        # Smallest k with share[k-1] ≥ energy; a tiny slack so energy=1 is not lost to rounding.
        k = min(k, int((share < energy - 1e-12).sum().item()) + 1)
    if max_rank is not None:
        k = min(k, max_rank)
    return k


def _work_dtype(weight: torch.Tensor) -> torch.dtype:
    return torch.float64 if weight.dtype == torch.float64 else torch.float32


def _target_weights(base: Weights, finetuned: Weights, targets: TargetSpec):
    """{module name: (base weight, finetuned weight)} and whether the layout is (in, out) (GPT-2 Conv1D)."""
    for weights in (base, finetuned):
        if isinstance(weights, nn.Module) and any(isinstance(m, AdaptedLayer) for m in weights.modules()):
            raise ConfigError(
                f"the {'base' if weights is base else 'finetuned'} model still has tuneforge adapters; call "
                "tuneforge.adapters.merge_and_unload(model) first so its weights are plain"
            )
    model = base if isinstance(base, nn.Module) else finetuned if isinstance(finetuned, nn.Module) else None
    base_state = base.state_dict() if isinstance(base, nn.Module) else base
    tuned_state = finetuned.state_dict() if isinstance(finetuned, nn.Module) else finetuned
    if model is not None:
        names, transposed = _linear_modules(model, targets)
    else:
        if targets == ALL_LINEAR or targets is None:
            raise ConfigError(
                f"target_modules={targets!r} needs models to tell Linear layers apart; with state dicts give the "
                "module names, e.g. target_modules=['q_proj', 'v_proj'] or a regex"
            )
        names = [k[: -len(".weight")] for k, v in base_state.items()
                 if k.endswith(".weight") and v.dim() == 2 and name_matches(targets, k[: -len(".weight")])]
        transposed = False
        if not names:
            leaves = sorted({k.split(".")[-2] for k, v in base_state.items() if k.endswith(".weight") and v.dim() == 2})
            raise ConfigError(
                f"target_modules={targets!r} matched no 2-D weight; modules with one: {', '.join(leaves)}"
            )
    pairs = {}
    for name in names:
        key = f"{name}.weight"
        if key not in base_state or key not in tuned_state:
            where = "base" if key not in base_state else "finetuned"
            raise AdapterError(f"the {where} weights have no '{key}': base and finetuned must be the same architecture")
        if base_state[key].shape != tuned_state[key].shape:
            raise AdapterError(
                f"'{key}' is {tuple(base_state[key].shape)} in the base but {tuple(tuned_state[key].shape)} in the "
                "finetuned weights: they are different architectures"
            )
        pairs[name] = (base_state[key].detach(), tuned_state[key].detach())
    return pairs, transposed


def _linear_modules(model: nn.Module, targets: TargetSpec) -> tuple[list[str], bool]:
    heads = output_head_names(model)
    names, layouts = [], set()
    for name, module in candidate_modules(model):
        if targets == ALL_LINEAR:
            hit = isinstance(module, linear_layer_types()) and name not in heads
        else:
            hit = name_matches(targets, name)
        if not hit:
            continue
        if not isinstance(module, linear_layer_types()):
            raise ConfigError(
                f"target '{name}' is a {type(module).__name__}; LoRA extraction supports Linear and Conv1D layers. "
                "Narrow target_modules"
            )
        names.append(name)
        layouts.add(is_transposed(module))
    if not names:
        raise ConfigError(f"target_modules={targets!r} matched no Linear module of {type(model).__name__}")
    if len(layouts) > 1:
        raise ConfigError("the targets mix Linear and Conv1D layers; extract them in two adapters")
    return names, layouts.pop()


def _name_of(weights: Weights) -> str | None:
    config = getattr(weights, "config", None)
    return getattr(config, "_name_or_path", None) or None


def _task_of(weights: Weights) -> str | None:
    return "CAUSAL_LM" if type(weights).__name__.endswith("ForCausalLM") else None
