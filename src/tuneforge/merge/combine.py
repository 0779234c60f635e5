"""Combine several LoRA adapters for one base model into a new LoRA adapter.

Every method works module by module, at one of three levels (PEFT's ``add_weighted_adapter``
semantics, so results agree with it); ``merge(tensors, weights)`` is one of ``merge.methods``::

    factors  A' = merge({A_i}, {sgn(w_i s_i)·√|w_i s_i|}),  B' = merge({B_i}, {√|w_i s_i|})
             linear, ties, dare_linear, dare_ties, magnitude_prune. Cheap, but an approximation:
             even for linear, B'A' = (Σ_i b_i B_i)(Σ_j a_j A_j) has cross terms i ≠ j.
    concat   A' = [w_1 s_1 A_1; ...; w_n s_n A_n]  (Σr, in),  B' = [B_1 ... B_n]  (out, Σr)
             cat, task_arithmetic. Exact: B'A' = Σ_i w_i s_i B_i A_i, at rank Σ_i r_i.
    delta    ΔW = merge({s_i B_i A_i}, {w_i}), then truncated SVD ΔW ≈ U_k S_k V_kᵀ with
             B' = U_k √S_k, A' = √S_k V_kᵀ, k = target_rank (default: the largest input rank)
             svd, ties_svd, dare_linear_svd, dare_ties_svd, magnitude_prune_svd.

s_i is adapter i's LoRA scaling (alpha / r, or alpha / √r with rsLoRA). The new adapter
has scaling 1 (alpha = r per module). Random methods (DARE) draw from a generator seeded by
``(seed, module name, factor)``, so a module's result does not depend on which others are merged.
"""

from __future__ import annotations

import difflib
import math
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Union

import torch

from tuneforge.adapters.config import LoraConfig
from tuneforge.adapters.targeting import name_matches
from tuneforge.errors import AdapterError, ConfigError
from tuneforge.merge import methods as ops
from tuneforge.merge.loras import (
    LoraAdapter,
    LoraModule,
    check_output_dir,
    factors_from_svd,
    lora_from_state,
    read_lora,
    write_lora,
)

AdapterSource = Union[str, Path, LoraAdapter, tuple[LoraConfig, dict[str, torch.Tensor]]]
ModuleFilter = Union[str, list[str], Callable[[str], bool], None]
Level = Literal["factors", "concat", "delta"]


@dataclass(frozen=True)
class MergeOptions:
    density: float | None
    majority_sign_method: str
    generator: torch.Generator | None = None


MergeFn = Callable[[list[torch.Tensor], list[float], MergeOptions], torch.Tensor]


@dataclass(frozen=True)
class CombineMethod:
    name: str
    level: Level
    merge: MergeFn | None  # None for concat: nothing is merged, factors are stacked
    uses_density: bool = False
    uses_sign: bool = False


def _sum(t, w, o):
    return ops.task_arithmetic(t, w)


def _ties(t, w, o):
    return ops.ties(t, w, o.density, o.majority_sign_method)


def _dare_linear(t, w, o):
    return ops.dare(t, w, o.density, generator=o.generator)


def _dare_ties(t, w, o):
    return ops.dare(t, w, o.density, majority_sign_method=o.majority_sign_method, generator=o.generator)


def _magnitude_prune(t, w, o):
    return ops.magnitude_prune(t, w, o.density)


# Families with density (and, for the TIES forms, sign election); each comes at the factor level
# and as an ``_svd`` form on full deltas.
_FAMILIES: dict[str, tuple[MergeFn, bool]] = {
    "ties": (_ties, True),
    "dare_linear": (_dare_linear, False),
    "dare_ties": (_dare_ties, True),
    "magnitude_prune": (_magnitude_prune, False),
}

COMBINE_METHODS: dict[str, CombineMethod] = {method.name: method for method in [
    CombineMethod("linear", "factors", _sum),
    CombineMethod("cat", "concat", None),
    CombineMethod("task_arithmetic", "concat", None),
    CombineMethod("svd", "delta", _sum),
    *(CombineMethod(family + suffix, level, fn, uses_density=True, uses_sign=sign)
      for family, (fn, sign) in _FAMILIES.items() for suffix, level in (("", "factors"), ("_svd", "delta"))),
]}


def get_combine_method(name: str) -> CombineMethod:
    if name not in COMBINE_METHODS:
        close = difflib.get_close_matches(str(name), list(COMBINE_METHODS), n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"unknown merge method {name!r}. Available: {', '.join(COMBINE_METHODS)}.{hint}")
    return COMBINE_METHODS[name]


def combine_loras(adapters: Sequence[AdapterSource], weights: Sequence[float], method: str, *,
                  density: float | None = None, majority_sign_method: str = "total",
                  target_rank: int | None = None, seed: int = 0, module_filter: ModuleFilter = None) -> LoraAdapter:
    """The new adapter, in memory; see the module docstring for what each method computes."""
    spec = _check_options(len(adapters), weights, method, density, majority_sign_method, target_rank)
    loras = [as_lora(a) for a in adapters]
    names = _module_names(loras, module_filter)
    _check_compatible(loras, names, spec)
    if spec.level == "delta" and target_rank is None:
        target_rank = max(m.rank for lora in loras for m in lora.modules.values())  # PEFT's default
    combined = {}
    for name in names:
        present = [(float(w), lora.modules[name]) for w, lora in zip(weights, loras) if name in lora.modules]

        def options(part: str, name=name) -> MergeOptions:
            return MergeOptions(density, majority_sign_method, _generator(seed, name, part))

        if spec.level == "factors":
            combined[name] = _combine_factors(spec, present, options)
        elif spec.level == "concat":
            combined[name] = _concatenate(present)
        else:
            combined[name] = _combine_deltas(spec, present, options("delta"), target_rank)
    first = loras[0]
    return LoraAdapter(combined, fan_in_fan_out=first.fan_in_fan_out, base_model=first.base_model,
                       task_type=first.task_type, source=f"{method} of {len(loras)} adapters")


def combine_adapters(adapters: Sequence[AdapterSource], weights: Sequence[float], method: str,
                     output_dir: str | Path, *, density: float | None = None, majority_sign_method: str = "total",
                     target_rank: int | None = None, seed: int = 0, overwrite: bool = False,
                     module_filter: ModuleFilter = None) -> Path:
    """Combine LoRA adapters (directories in PEFT format, or ``(LoraConfig, state_dict)`` pairs) into a
    new adapter directory; nothing is written unless the whole combination succeeds.

    ``weights``: one per adapter, negative to subtract a skill. ``density``: kept fraction for
    ties / dare / magnitude_prune. ``target_rank``: rank of the ``svd`` forms (default: the largest
    input rank). ``module_filter``: names or suffixes (list), a regex (str) or a predicate selecting
    the modules to keep. Returns the output directory.
    """
    check_output_dir(output_dir, overwrite)
    combined = combine_loras(adapters, weights, method, density=density, majority_sign_method=majority_sign_method,
                             target_rank=target_rank, seed=seed, module_filter=module_filter)
    card = _card(adapters, weights, method, density, majority_sign_method, target_rank, seed, combined)
    return write_lora(combined, output_dir, overwrite=overwrite, card=card)


def as_lora(source: AdapterSource) -> LoraAdapter:
    if isinstance(source, LoraAdapter):
        return source
    if isinstance(source, (str, Path)):
        return read_lora(source)
    if isinstance(source, tuple) and len(source) == 2:
        return lora_from_state(source[0], source[1])
    raise ConfigError(
        f"cannot read an adapter from a {type(source).__name__}; give a directory path, a LoraAdapter, "
        "or a (LoraConfig, state_dict) pair"
    )


def _check_options(count: int, weights, method, density, majority_sign_method, target_rank) -> CombineMethod:
    """Every problem with the arguments, reported at once."""
    spec = get_combine_method(method)
    problems = []
    if count == 0:
        problems.append("no adapters given: pass at least one adapter")
    if len(weights) != count:
        problems.append(f"got {len(weights)} weights for {count} adapters; give one weight per adapter")
    elif not all(isinstance(w, (int, float)) and math.isfinite(w) for w in weights):
        problems.append(f"weights={list(weights)!r} must all be finite numbers")
    if spec.uses_density:
        try:
            ops.check_density(density, method)
        except ConfigError as exc:
            problems.append(str(exc))
    elif density is not None:
        users = ", ".join(n for n, m in COMBINE_METHODS.items() if m.uses_density)
        problems.append(f"density={density!r} has no effect with method '{method}'; it is used by {users}")
    if spec.uses_sign:
        try:
            ops.check_sign_method(majority_sign_method)
        except ConfigError as exc:
            problems.append(str(exc))
    if target_rank is not None:
        if spec.level != "delta":
            svd_methods = ", ".join(n for n, m in COMBINE_METHODS.items() if m.level == "delta")
            problems.append(f"target_rank={target_rank!r} applies only to the SVD methods ({svd_methods}), "
                            f"not '{method}'")
        elif not isinstance(target_rank, int) or target_rank < 1:
            problems.append(f"target_rank={target_rank!r} must be a positive integer")
    if problems:
        raise ConfigError("cannot combine adapters:\n" + "\n".join(f"  - {p}" for p in problems))
    return spec


def _module_names(loras: list[LoraAdapter], module_filter: ModuleFilter) -> list[str]:
    names = list(dict.fromkeys(name for lora in loras for name in lora.modules))
    if module_filter is None:
        return names
    keep = module_filter if callable(module_filter) else (lambda n: name_matches(module_filter, n))
    kept = [n for n in names if keep(n)]
    if not kept:
        raise ConfigError(
            f"module_filter={module_filter!r} kept none of the adapters' modules, e.g. {', '.join(names[:3])}"
        )
    return kept


def _check_compatible(loras: list[LoraAdapter], names: list[str], spec: CombineMethod) -> None:
    if len({lora.fan_in_fan_out for lora in loras}) > 1:
        raise AdapterError("the adapters disagree on fan_in_fan_out: they were made for different base models")
    for name in names:
        present = [(lora, lora.modules[name]) for lora in loras if name in lora.modules]
        shapes = {(m.shape, m.embedding) for _, m in present}
        if len(shapes) > 1:
            seen = ", ".join(f"{lora.source}: {m.shape[0]}x{m.shape[1]}" for lora, m in present)
            raise AdapterError(
                f"module '{name}' has different weight shapes in the adapters ({seen}): they were made for "
                "different base models and cannot be combined"
            )
    if spec.level != "factors":
        return
    for lora in loras:
        missing = [n for n in names if n not in lora.modules]
        if missing:
            raise AdapterError(
                f"'{spec.name}' merges A and B factor by factor, so every adapter needs the same target modules; "
                f"{lora.source} has no {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}. "
                "Use 'cat' (exact) or an SVD method (e.g. 'svd', 'ties_svd'), or a module_filter"
            )
    for name in names:
        ranks = [lora.modules[name].rank for lora in loras]
        if len(set(ranks)) > 1:
            raise AdapterError(
                f"'{spec.name}' merges A and B factor by factor, so ranks must be equal; module '{name}' has "
                f"ranks {ranks}. Use 'cat' (exact) or an SVD method (e.g. 'svd', 'ties_svd') instead"
            )


def _generator(seed: int, module: str, part: str) -> torch.Generator:
    return torch.Generator().manual_seed((int(seed) * 0x9E3779B1 + zlib.crc32(f"{module}:{part}".encode())) % 2**63)


def _combine_factors(spec: CombineMethod, present: list[tuple[float, LoraModule]],
                     options: Callable[[str], MergeOptions]) -> LoraModule:
    # √|w s| on each factor, the sign on A only, so that B'A' carries w s with its sign.
    scaled = [w * m.scaling for w, m in present]
    weights_a = [math.sqrt(abs(x)) * (1.0 if x >= 0 else -1.0) for x in scaled]
    weights_b = [math.sqrt(abs(x)) for x in scaled]
    dtype = present[0][1].A.dtype
    a = spec.merge([m.A.float() for _, m in present], weights_a, options("A"))  # (r, in)
    b = spec.merge([m.B.float() for _, m in present], weights_b, options("B"))  # (out, r)
    return LoraModule(a.to(dtype), b.to(dtype), 1.0, present[0][1].embedding)


def _concatenate(present: list[tuple[float, LoraModule]]) -> LoraModule:
    dtype = present[0][1].A.dtype
    a = torch.cat([m.A.float() * (w * m.scaling) for w, m in present], dim=0)  # (Σr, in)
    b = torch.cat([m.B.float() for _, m in present], dim=1)  # (out, Σr)
    return LoraModule(a.to(dtype), b.to(dtype), 1.0, present[0][1].embedding)


def _combine_deltas(spec: CombineMethod, present: list[tuple[float, LoraModule]], options: MergeOptions,
                    target_rank: int) -> LoraModule:
    delta = spec.merge([m.delta() for _, m in present], [w for w, _ in present], options)  # (out, in)
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)  # (out, m), (m,), (m, in)
    a, b = factors_from_svd(u, s, vh, target_rank)
    return LoraModule(a.to(present[0][1].A.dtype), b.to(present[0][1].A.dtype), 1.0, present[0][1].embedding)


def _card(adapters, weights, method, density, majority_sign_method, target_rank, seed, combined: LoraAdapter) -> str:
    sources = "\n".join(
        f"| {a if isinstance(a, (str, Path)) else type(a).__name__} | {w} |" for a, w in zip(adapters, weights)
    )
    spec = COMBINE_METHODS[method]
    settings = [f"- method: `{method}`"]
    if spec.uses_density:
        settings.append(f"- density: {density}")
    if spec.uses_sign:
        settings.append(f"- majority_sign_method: `{majority_sign_method}`")
    if spec.level == "delta":
        settings.append(f"- target_rank: {target_rank or 'largest input rank'}")
    if method.startswith("dare"):
        settings.append(f"- seed: {seed}")
    ranks = sorted(combined.ranks())
    return (
        f"---\nlibrary_name: peft\nbase_model: {combined.base_model or '(not recorded)'}\n"
        "tags: [tuneforge, lora, merge]\n---\n\n# Combined LoRA adapter\n\n"
        "Made by `tuneforge.merge.combine_adapters`.\n\n"
        + "\n".join(settings)
        + f"\n- modules: {len(combined.modules)}, ranks: {ranks}\n\n| adapter | weight |\n|---|---|\n{sources}\n"
    )
