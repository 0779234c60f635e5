"""MoS (Wang et al. 2024, "Mixture of Shards"): LoRA factors assembled from shard pools shared by layers.

Paper: Wang et al., "MoS: Unleashing Parameter Efficiency of Low-Rank Adaptation with Mixture of Shards",
ICLR 2025, arXiv:2410.00938; implements the four techniques of its method section (subset selection, pair
dissociation, vector sharding, shard privatization), listed below.

Vector sharding: each row of A (length in) and each column of B (length out) is cut into
``shards_per_vector`` equal shards. The adapter keeps global pools of trainable shards, one per side
and shard length (layers whose shards have the same shape share a pool), and each layer builds
its A and B by concatenating shards it indexes:

    A[i] = [pool_A[a_{i,1}] | … | pool_A[a_{i,m}] | private_A[i]],   likewise B[:, i] from pool_B

- subset selection: each layer uses a fixed random subset of its pool, r · m distinct shards per
  side (m = shards_per_vector − private_shards), drawn from ``seed`` and the module name;
- pair dissociation: A's and B's indices are drawn independently, so shards shared by two layers
  on the A side need not be paired on the B side;
- shard privatization: the last ``private_shards`` shards of every vector belong to the layer alone.

ΔW = (alpha / r) · B A. The B pool and private B shards start at zero, so the model is unchanged at
init. PEFT has no MoS; the file is tuneforge's: pools under ``base_model.mos_pool_{A,B}_<shard length>``
and, per layer, the index tables and private shards.
"""

from __future__ import annotations

import math
import zlib
from pathlib import Path
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from tuneforge.adapters.layer import LayerAdapter
from tuneforge.adapters.lora.lora import is_transposed, refuse_quantized_merge, weight_shape
from tuneforge.adapters.sharing.vera import LayerGroup, PeftFlags, SharedGroupConfig, check_rank_fits, layer_group
from tuneforge.errors import AdapterError


class MosConfig(SharedGroupConfig, PeftFlags):
    """MoS: rank ``r``; vectors cut into ``shards_per_vector`` shards, the last ``private_shards`` of
    them per layer; ``pool_size`` shared shards per pool (per side and shard length)."""

    method: Literal["mos"] = "mos"
    r: int = Field(8, gt=0)
    alpha: float = Field(16.0, gt=0)
    shards_per_vector: int = Field(2, gt=0)
    private_shards: int = Field(0, ge=0)
    pool_size: int = Field(256, gt=0)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    seed: int = 0

    peft_type: ClassVar[str | None] = None

    @model_validator(mode="after")
    def _private_within_vector(self):
        if self.private_shards > self.shards_per_vector:
            raise ValueError(f"private_shards={self.private_shards} exceeds shards_per_vector={self.shards_per_vector}")
        return self


class ShardPools(LayerGroup, nn.Module):
    """One adapter's shared pools, keyed ``A_<shard length>`` / ``B_<shard length>``; a submodule of each
    of its layer adapters (one module, so moved and counted once)."""

    def __init__(self, pool_size: int):
        nn.Module.__init__(self)
        LayerGroup.__init__(self)
        self.pool_size = pool_size
        self.pools = nn.ParameterDict()
        self._loaded_from: dict[str, torch.Tensor] = {}  # held, not ids (ids are reused): copy once per file

    def pool(self, side: str, shard_length: int, fan_in: int) -> tuple[str, nn.Parameter]:
        key = f"{side}_{shard_length}"
        if key not in self.pools:
            if side == "A":  # LoRA's Kaiming-uniform bound for A, over the full row's fan-in
                bound = 1 / math.sqrt(fan_in)
                self.pools[key] = nn.Parameter(torch.empty(self.pool_size, shard_length).uniform_(-bound, bound))
            else:
                self.pools[key] = nn.Parameter(torch.zeros(self.pool_size, shard_length))
        return key, self.pools[key]

    def load(self, key: str, value: torch.Tensor) -> None:
        if self._loaded_from.get(key) is not value:
            with torch.no_grad():
                self.pools[key].copy_(value)
            self._loaded_from[key] = value


def draw_subset(module_name: str, side: str, seed: int, pool_size: int, count: int) -> torch.Tensor:
    """``count`` distinct pool indices, fixed by (seed, module, side): independent per side (pair dissociation)."""
    key = zlib.crc32(f"{module_name}:{side}".encode())  # stable across runs, unlike hash()
    generator = torch.Generator().manual_seed(seed * 1_000_003 + key)
    return torch.randperm(pool_size, generator=generator)[:count]


class MosLinear(LayerAdapter):
    """MoS on a Linear or Conv1D layer."""

    def __init__(self, pools: ShardPools, module_name: str, in_features: int, out_features: int, config: MosConfig,
                 transposed: bool, owns_pools: bool):
        super().__init__()
        self.pools, self.owns_pools, self.transposed = pools, owns_pools, transposed
        self.r = config.r
        self.scaling = config.alpha / config.r
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        shards, private = config.shards_per_vector, config.private_shards
        shared = shards - private
        self.length_a, self.length_b = in_features // shards, out_features // shards
        self.key_a, _ = pools.pool("A", self.length_a, in_features)
        self.key_b, _ = pools.pool("B", self.length_b, out_features)
        for side in ("A", "B"):
            picked = draw_subset(module_name, side, config.seed, config.pool_size, config.r * shared)
            self.register_buffer(f"mos_{side}_index", picked.reshape(config.r, shared), persistent=False)
        self.private_shards = private
        if private:
            bound = 1 / math.sqrt(in_features)
            self.mos_A_private = nn.Parameter(torch.empty(config.r, private, self.length_a).uniform_(-bound, bound))
            self.mos_B_private = nn.Parameter(torch.zeros(config.r, private, self.length_b))

    def train(self, mode: bool = True):
        self.pools.sealed = True  # add_adapter has built every layer of this adapter
        return super().train(mode)

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """A (r, in) and B (out, r): each vector is its pool shards followed by its private shards."""
        rows_a = self.pools.pools[self.key_a][self.mos_A_index]  # (r, shared shards, in/shards)
        cols_b = self.pools.pools[self.key_b][self.mos_B_index]  # (r, shared shards, out/shards)
        if self.private_shards:
            rows_a = torch.cat([rows_a, self.mos_A_private], dim=1)  # (r, shards, in/shards)
            cols_b = torch.cat([cols_b, self.mos_B_private], dim=1)  # (r, shards, out/shards)
        return rows_a.reshape(self.r, -1), cols_b.reshape(self.r, -1).T

    def transform_output(self, x, out, base_layer):
        lora_a, lora_b = self.factors()
        x = self.dropout(x).to(lora_a.dtype)
        return out + (F.linear(F.linear(x, lora_a), lora_b) * self.scaling).to(out.dtype)

    def delta_weight(self, base_layer) -> torch.Tensor:
        lora_a, lora_b = self.factors()
        delta = lora_b @ lora_a * self.scaling  # (out, in)
        return delta.T if self.transposed else delta

    def merge(self, base_layer, safe):
        refuse_quantized_merge(base_layer)
        super().merge(base_layer, safe)

    def private_parameters(self) -> list[nn.Parameter]:
        return [self.mos_A_private, self.mos_B_private] if self.private_shards else []

    def file_tensors(self):
        tensors = {"mos_A_index": self.mos_A_index, "mos_B_index": self.mos_B_index}
        if self.private_shards:
            tensors.update(mos_A_private=self.mos_A_private, mos_B_private=self.mos_B_private)
        return tensors

    def shared_file_tensors(self) -> dict[str, torch.Tensor]:
        return {f"mos_pool_{key}": self.pools.pools[key] for key in (self.key_a, self.key_b)}

    def load_shared_file_tensors(self, tensors: dict[str, torch.Tensor], path: Path) -> set[str]:
        used = set()
        for key in (self.key_a, self.key_b):
            leaf, target = f"mos_pool_{key}", self.pools.pools[key]
            value = tensors.get(leaf)
            if value is None or value.shape != target.shape:
                found = "missing" if value is None else f"of shape {tuple(value.shape)}"
                raise AdapterError(f"{path}: shard pool 'base_model.{leaf}' is {found}; this config needs "
                                   f"{tuple(target.shape)} (pool_size, shard length)")
            self.pools.load(key, value)
            used.add(leaf)
        return used

    def parameter_roles(self):
        roles = {"mos_private": self.private_parameters()}
        if self.owns_pools:
            roles["mos_pools"] = list(self.pools.pools.values())
        return roles


def build_mos(base_layer: nn.Module, config: MosConfig, module_name: str) -> MosLinear:
    in_features, out_features = weight_shape(base_layer)
    check_rank_fits(config.r, in_features, out_features, module_name)
    for side, size in (("in_features", in_features), ("out_features", out_features)):
        if size % config.shards_per_vector:
            raise AdapterError(
                f"shards_per_vector={config.shards_per_vector} does not divide {side}={size} of '{module_name}': "
                "vectors are cut into equal shards. Pick a shards_per_vector dividing every targeted layer's sizes."
            )
    needed = config.r * (config.shards_per_vector - config.private_shards)
    if needed > config.pool_size:
        raise AdapterError(
            f"pool_size={config.pool_size} is too small for '{module_name}': each layer picks a subset of "
            f"r x (shards_per_vector - private_shards) = {needed} distinct shards per side. Raise pool_size to at "
            f"least {needed}, or lower r / shards_per_vector."
        )
    pools = layer_group(config, module_name, lambda: ShardPools(config.pool_size))
    owns_pools = len(pools.module_names) == 1  # the group's first layer reports the pools to the optimizer
    return MosLinear(pools, module_name, in_features, out_features, config, is_transposed(base_layer), owns_pools)
