"""Merge whole models tensor by tensor, streamed from safetensors: memory holds a few tensors, not models.

For each weight name, the tensors of every input are read (one per model, plus the base), combined
in float32 and written straight into the output shard; nothing else stays in memory. With θ_i the
models, θ_0 the base, τ_i = θ_i − θ_0 their task vectors and w_i their weights::

    linear            Σ_i w_i θ_i / Σ_i w_i   (normalize: true; else Σ_i w_i θ_i)
    task_arithmetic   θ_0 + Σ_i w_i τ_i                          (Ilharco et al. 2023)
    magnitude_prune   θ_0 + Σ_i w_i trim(τ_i, d_i)
    ties              θ_0 + disjoint_mean(w_i trim(τ_i, d_i))    (Yadav et al. 2023)
    dare_linear       θ_0 + Σ_i w_i drop(τ_i, d_i)               (Yu et al. 2024)
    dare_ties         θ_0 + disjoint_mean(w_i drop(τ_i, d_i))
    slerp             spherical interpolation of two models at t (lerp when nearly colinear)
    model_stock       t·mean_i θ_i + (1 − t)·θ_0 with t = k cosθ / ((k − 1) cosθ + 1)  (Jang et al. 2024)

trim / drop / sign election / disjoint mean are ``merge.methods``' steps, with PEFT's conventions
(k = ⌊d·n⌋ kept; the sign is elected on the unweighted tensors); each model may have its own density.
Non-float tensors (integer buffers) are copied from the reference model (the base, else the first).
"""

from __future__ import annotations

import json
import math
import shutil
import zlib
from collections.abc import Callable
from pathlib import Path

import torch

from tuneforge.errors import ConfigError, ModelLoadError
from tuneforge.merge import methods as ops
from tuneforge.merge.config import FullMergeConfig, parse_size
from tuneforge.merge.safetensors_stream import SafetensorsModel, TensorInfo, write_streamed

# Files that make a directory of weights a loadable transformers model, copied from the reference.
MODEL_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
               "special_tokens_map.json", "chat_template.jinja", "vocab.json", "merges.txt", "tokenizer.model",
               "added_tokens.json")
# Below this |cos| distance from ±1 the two vectors are treated as colinear: sin Ω ≈ 0 makes the
# slerp weights ill-conditioned, and the arc is a straight line anyway.
SLERP_COLINEAR = 1e-6

TensorMerge = Callable[[str, torch.Tensor | None, list[torch.Tensor]], torch.Tensor]


def slerp(v0: torch.Tensor, v1: torch.Tensor, t: float) -> torch.Tensor:
    """Spherical linear interpolation (Shoemake 1985) between two tensors seen as flat vectors.

    Ω is the angle between v0 and v1; the result is sin((1−t)Ω)/sin Ω · v0 + sin(tΩ)/sin Ω · v1,
    the constant-speed path on the arc. Nearly colinear vectors fall back to (1−t)·v0 + t·v1.
    """
    a, b = v0.reshape(-1).double(), v1.reshape(-1).double()
    norms = a.norm() * b.norm()
    cos = float((a @ b) / norms) if norms > 0 else 1.0
    if abs(cos) > 1 - SLERP_COLINEAR:
        return (1 - t) * v0 + t * v1
    omega = math.acos(max(-1.0, min(1.0, cos)))
    sin_omega = math.sin(omega)
    return (math.sin((1 - t) * omega) / sin_omega) * v0 + (math.sin(t * omega) / sin_omega) * v1


def model_stock_ratio(deltas: list[torch.Tensor]) -> float:
    """Model Stock's interpolation ratio t = k cosθ / ((k−1) cosθ + 1) (Jang et al. 2024, eq. 2).

    cosθ is the mean pairwise cosine between the k fine-tuned deltas. The paper's geometry assumes
    an acute angle; a negative mean cosine is clamped to 0, which gives t = 0 (the base weight).
    Deltas that are all zero give t = 1 (the average, which then equals the base).
    """
    k = len(deltas)
    flat = [d.reshape(-1).double() for d in deltas]
    cosines = []
    for i in range(k):
        for j in range(i + 1, k):
            norms = flat[i].norm() * flat[j].norm()
            if norms > 0:
                cosines.append(float(flat[i] @ flat[j] / norms))
    if not cosines:
        return 1.0
    cos = max(0.0, sum(cosines) / len(cosines))
    return k * cos / ((k - 1) * cos + 1)


def tensor_merge_for(config: FullMergeConfig) -> TensorMerge:
    """The function that combines one weight: (name, base tensor or None, model tensors) -> merged."""
    method = config.merge_method
    weights = [m.parameters.weight for m in config.models]
    densities = [config.density_for(i) for i in range(len(config.models))] if method in (
        "ties", "dare_linear", "dare_ties", "magnitude_prune") else []
    sign_method = config.parameters.majority_sign_method

    def linear(name, base, tensors):
        total = sum(w * t for w, t in zip(weights, tensors))
        return total / sum(weights) if config.parameters.normalize else total

    def from_base(combine):
        def merged(name, base, tensors):
            return base + combine(name, [t - base for t in tensors])
        return merged

    def trimmed(deltas):
        return [ops.trim_by_magnitude(d, dens) for d, dens in zip(deltas, densities)]

    def dropped(name, deltas):
        return [ops.random_drop(d, dens, _generator(config.parameters.seed, name, i))
                for i, (d, dens) in enumerate(zip(deltas, densities))]

    def disjoint(deltas):
        stacked = torch.stack(deltas)  # (n, *shape)
        w = torch.tensor(weights, dtype=stacked.dtype).reshape((-1,) + (1,) * (stacked.dim() - 1))
        return ops.disjoint_mean(stacked * w, ops.elect_sign(stacked, sign_method))

    def slerp_pair(name, base, tensors):
        ends = ([base] if base is not None else []) + tensors
        return slerp(ends[0], ends[1], config.parameters.t)

    def model_stock(name, base, tensors):
        t = model_stock_ratio([x - base for x in tensors])
        return t * (sum(tensors) / len(tensors)) + (1 - t) * base

    table: dict[str, TensorMerge] = {
        "linear": linear,
        "task_arithmetic": from_base(lambda name, deltas: ops.task_arithmetic(deltas, weights)),
        "magnitude_prune": from_base(lambda name, deltas: ops.task_arithmetic(trimmed(deltas), weights)),
        "ties": from_base(lambda name, deltas: disjoint(trimmed(deltas))),
        "dare_linear": from_base(lambda name, deltas: ops.task_arithmetic(dropped(name, deltas), weights)),
        "dare_ties": from_base(lambda name, deltas: disjoint(dropped(name, deltas))),
        "slerp": slerp_pair,
        "model_stock": model_stock,
    }
    return table[method]


def _generator(seed: int, tensor_name: str, model_index: int) -> torch.Generator:
    """One stream per (tensor, model): a tensor's mask does not depend on which other tensors exist."""
    return torch.Generator().manual_seed((int(seed) * 0x9E3779B1 + zlib.crc32(f"{tensor_name}:{model_index}".encode()))
                                         % 2**63)


def merge_models(config: FullMergeConfig, staging_dir: Path, *,
                 open_model: Callable[[Path], SafetensorsModel] = SafetensorsModel) -> dict[str, object]:
    """Write the merged model into ``staging_dir`` (weights + config/tokenizer files); returns a summary.

    ``open_model`` is the reader factory (tests pass an instrumented one to count tensors held).
    """
    from tuneforge.models import resolve_model_dir

    base_dir = resolve_model_dir(config.base_model) if config.base_model else None
    model_dirs = [resolve_model_dir(entry.model) for entry in config.models]
    reference_dir = base_dir or model_dirs[0]
    merge_one = tensor_merge_for(config)
    out_dtype = getattr(torch, config.dtype) if config.dtype else None
    base = open_model(base_dir) if base_dir else None
    models = [open_model(d) for d in model_dirs]
    try:
        reference = base or models[0]
        plan = _plan(reference, [m for m in [base, *models] if m is not None], out_dtype)

        def produce(info: TensorInfo) -> torch.Tensor:
            base_tensor = base.get(info.name) if base is not None else None
            tensors = [m.get(info.name) for m in models]
            source_dtype = (base_tensor if base_tensor is not None else tensors[0]).dtype
            if not source_dtype.is_floating_point:
                return (base_tensor if base_tensor is not None else tensors[0]).to(info.dtype)
            merged = merge_one(info.name, None if base_tensor is None else base_tensor.float(),
                               [t.float() for t in tensors])
            del base_tensor, tensors
            return merged.to(info.dtype)

        staging_dir.mkdir(parents=True, exist_ok=True)
        files = write_streamed(staging_dir, plan, produce, parse_size(config.max_shard_size),
                               metadata={"format": "pt", "tuneforge_merge_method": config.merge_method})
    finally:
        for model in [base, *models]:
            if model is not None:
                model.close()
    copied = copy_model_files(reference_dir, staging_dir, out_dtype)
    return {"method": config.merge_method, "tensors": len(plan), "bytes": sum(i.nbytes for i in plan),
            "shards": [f.name for f in files], "copied": copied}


def _plan(reference: SafetensorsModel, all_models: list[SafetensorsModel],
          out_dtype: torch.dtype | None) -> list[TensorInfo]:
    """Output tensors, checked first: every model must have every weight, in the same shape."""
    plan = []
    for name in reference.names():
        info = reference.info(name)
        for other in all_models:
            if name not in other.weight_map:
                raise ModelLoadError(f"{other.directory} has no weight '{name}' (the reference "
                                     f"{reference.directory} has it): the models differ in architecture")
            shape = other.info(name).shape
            if shape != info.shape:
                raise ModelLoadError(f"weight '{name}' is {list(shape)} in {other.directory} but {list(info.shape)} in "
                                     f"{reference.directory}: the models differ in size and cannot be merged")
        dtype = out_dtype if out_dtype is not None and info.dtype.is_floating_point else info.dtype
        plan.append(TensorInfo(name, info.shape, dtype))
    if not plan:
        raise ConfigError(f"{reference.directory} holds no tensors to merge")
    return plan


def copy_model_files(source: Path, destination: Path, dtype: torch.dtype | None) -> list[str]:
    """config.json and the tokenizer files, so ``from_pretrained(destination)`` works; dtype updated."""
    if not (source / "config.json").is_file():
        raise ModelLoadError(f"{source} has no config.json: the merged weights would not load; "
                             "use a directory saved with save_pretrained as the base (or first) model")
    copied = []
    for name in MODEL_FILES:
        if (source / name).is_file():
            shutil.copyfile(source / name, destination / name)
            copied.append(name)
    if dtype is not None:
        config_path = destination / "config.json"
        config = json.loads(config_path.read_text(encoding="utf-8"))
        dtype_key = "torch_dtype" if "torch_dtype" in config and "dtype" not in config else "dtype"
        config[dtype_key] = str(dtype).removeprefix("torch.")
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return copied
