"""LoRA adapters as plain tensors, without a model: read from PEFT files or state dicts, write back.

Merging and extraction work on the factors of each module, so they need no base model in memory.
Each module is kept in one orientation, ΔW = scaling · B A with A (r, in) and B (out, r), whatever
the layer kind (for an embedding "in" is the vocabulary, as in PEFT's ``lora_embedding_A``).
Output goes through the same format module as trained adapters (``adapters.peft_format``), with
per-module ranks in ``rank_pattern``; the directory appears whole or not at all.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from tuneforge.adapters.config import LoraConfig
from tuneforge.adapters.lora.lora import lora_scaling
from tuneforge.adapters.peft_format import (
    CONFIG_FILE,
    PREFIX,
    WEIGHTS_FILE,
    read_adapter_config,
    read_adapter_tensors,
)
from tuneforge.errors import AdapterError, ConfigError

# File leaf names of the two factors, per layer kind (PEFT's naming).
LINEAR_LEAVES = ("lora_A.weight", "lora_B.weight")
EMBEDDING_LEAVES = ("lora_embedding_A", "lora_embedding_B")


@dataclass
class LoraModule:
    """One module's factors: ΔW = scaling · B A, A (r, in), B (out, r)."""

    A: torch.Tensor
    B: torch.Tensor
    scaling: float = 1.0
    embedding: bool = False

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    @property
    def shape(self) -> tuple[int, int]:
        """(out, in) of ΔW."""
        return self.B.shape[0], self.A.shape[1]

    def delta(self) -> torch.Tensor:
        """scaling · B A in float32, (out, in)."""
        return (self.B.float() @ self.A.float()) * self.scaling


@dataclass
class LoraAdapter:
    """A LoRA adapter as module name -> factors, plus what the PEFT config needs to say about it."""

    modules: dict[str, LoraModule]
    fan_in_fan_out: bool = False
    base_model: str | None = None
    task_type: str | None = None
    source: str = "(in memory)"

    def ranks(self) -> set[int]:
        return {m.rank for m in self.modules.values()}


def read_lora(directory: str | Path) -> LoraAdapter:
    """Read a LoRA adapter saved by tuneforge or peft."""
    directory = Path(directory)
    if not directory.is_dir():
        raise AdapterError(f"adapter directory {directory} does not exist")
    config = read_adapter_config(directory)
    raw = json.loads((directory / CONFIG_FILE).read_text(encoding="utf-8"))
    adapter = lora_from_state(config, read_adapter_tensors(directory), source=str(directory))
    adapter.base_model = raw.get("base_model_name_or_path")
    adapter.task_type = raw.get("task_type")
    return adapter


def lora_from_state(config: LoraConfig, tensors: Mapping[str, torch.Tensor],
                    source: str = "(state dict)") -> LoraAdapter:
    """Group a PEFT-style state dict (keys with or without ``base_model.model.``) into modules."""
    if not isinstance(config, LoraConfig):
        raise AdapterError(f"{source}: only LoRA adapters can be merged here, this one is '{config.method}'")
    if config.use_dora:
        raise AdapterError(
            f"{source}: DoRA adapters cannot be combined as LoRA factors (their magnitude vector rescales the "
            "whole weight); merge them into the base model instead"
        )
    if config.modules_to_save:
        raise AdapterError(
            f"{source}: the adapter has modules_to_save={config.modules_to_save}; whole-module copies cannot be "
            "combined. Re-save the adapter without them to combine its LoRA part"
        )
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        name = key[len(PREFIX):] if key.startswith(PREFIX) else key
        leaf = next((leaf for leaf in LINEAR_LEAVES + EMBEDDING_LEAVES if name.endswith("." + leaf)), None)
        if leaf is None:
            raise AdapterError(
                f"{source}: tensor '{key}' is not a LoRA factor (expected names ending in "
                f"{', '.join(LINEAR_LEAVES + EMBEDDING_LEAVES)})"
            )
        parts.setdefault(name[: -len(leaf) - 1], {})[leaf] = tensor
    if not parts:
        raise AdapterError(f"{source}: the adapter holds no LoRA tensors")
    modules = {}
    for name, found in parts.items():
        embedding = EMBEDDING_LEAVES[0] in found or EMBEDDING_LEAVES[1] in found
        leaf_a, leaf_b = EMBEDDING_LEAVES if embedding else LINEAR_LEAVES
        if leaf_a not in found or leaf_b not in found:
            missing = leaf_a if leaf_a not in found else leaf_b
            raise AdapterError(f"{source}: module '{name}' has no tensor '{missing}'")
        a, b = found[leaf_a], found[leaf_b]
        r = config.rank_for(name)
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != r or b.shape[1] != r:
            raise AdapterError(
                f"{source}: module '{name}' has A {tuple(a.shape)} and B {tuple(b.shape)}, but its config "
                f"rank is r={r}; the config and the weights do not belong together"
            )
        modules[name] = LoraModule(a, b, lora_scaling(config.alpha_for(name), r, config.use_rslora), embedding)
    return LoraAdapter(modules, fan_in_fan_out=config.fan_in_fan_out, source=source)


def factors_from_svd(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor,
                     rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-k factors of U S Vᵀ (Eckart–Young): A = √S_k V_kᵀ (k, in), B = U_k √S_k (out, k).

    k = min(rank, len(s)); S is split evenly between the factors so both have one scale, which
    suits further training better than PEFT's B = U_k S_k, A = V_kᵀ (the product is the same).
    """
    k = min(rank, s.shape[0])
    root = s[:k].sqrt()
    return root[:, None] * vh[:k], u[:, :k] * root


def lora_config_for(adapter: LoraAdapter) -> LoraConfig:
    """A config that reproduces ``adapter`` exactly: scaling 1 everywhere (alpha = r per module).

    The most common rank becomes ``r``; other modules get escaped full-name entries in
    ``rank_pattern``/``alpha_pattern`` (PEFT matches pattern keys as regexes on the module name).
    """
    ranks = Counter(m.rank for m in adapter.modules.values())
    r = ranks.most_common(1)[0][0]
    odd = {re.escape(name): m.rank for name, m in adapter.modules.items() if m.rank != r}
    return LoraConfig(
        r=r, alpha=float(r), target_modules=list(adapter.modules), rank_pattern=odd,
        alpha_pattern={k: float(v) for k, v in odd.items()}, fan_in_fan_out=adapter.fan_in_fan_out,
    )


def lora_state(adapter: LoraAdapter) -> dict[str, torch.Tensor]:
    """PEFT file keys -> tensors, with scaling folded into B so that the config's alpha = r holds."""
    state = {}
    for name, module in adapter.modules.items():
        leaf_a, leaf_b = EMBEDDING_LEAVES if module.embedding else LINEAR_LEAVES
        b = module.B if module.scaling == 1.0 else (module.B.float() * module.scaling).to(module.B.dtype)
        state[f"{PREFIX}{name}.{leaf_a}"] = module.A.detach().cpu().contiguous()
        state[f"{PREFIX}{name}.{leaf_b}"] = b.detach().cpu().contiguous()
    return state


def check_output_dir(output_dir: str | Path, overwrite: bool) -> Path:
    output_dir = Path(output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise ConfigError(f"output_dir={str(output_dir)!r} is a file; give a directory path")
    if output_dir.exists() and not overwrite:
        raise ConfigError(f"output_dir={str(output_dir)!r} already exists; pick a new path or pass overwrite=True")
    return output_dir


def write_lora(adapter: LoraAdapter, output_dir: str | Path, *, overwrite: bool = False, card: str = "") -> Path:
    """Write ``adapter`` in PEFT format into a temp dir beside ``output_dir``, then rename it into place."""
    output_dir = check_output_dir(output_dir, overwrite)
    if not adapter.modules:
        raise AdapterError("the adapter to write has no modules")
    config = lora_config_for(adapter).to_peft_dict()
    config.update(base_model_name_or_path=adapter.base_model, task_type=adapter.task_type, inference_mode=True)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.", suffix=".tmp", dir=output_dir.parent))
    try:
        save_file(lora_state(adapter), str(staging / WEIGHTS_FILE), metadata={"format": "pt"})
        text = json.dumps(config, indent=2, sort_keys=True, default=str) + "\n"
        (staging / CONFIG_FILE).write_text(text, encoding="utf-8")
        if card:
            (staging / "README.md").write_text(card, encoding="utf-8")
        _move_into_place(staging, output_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return output_dir


def _move_into_place(staging: Path, output_dir: Path) -> None:
    """Rename the finished directory in; an existing one (overwrite=True) is moved aside first."""
    if not output_dir.exists():
        os.replace(staging, output_dir)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.", suffix=".old", dir=output_dir.parent))
    os.replace(output_dir, old / "previous")
    try:
        os.replace(staging, output_dir)
    except BaseException:
        os.replace(old / "previous", output_dir)
        raise
    finally:
        shutil.rmtree(old, ignore_errors=True)
