"""LoRETTA_rep (Yang et al. 2024): the weight update as a tensor train of small cores.

out and in are each split into ``num_cores`` factors (out = o_1⋯o_d, in = i_1⋯i_d, as balanced as
the sizes allow), and ΔW, seen as a tensor indexed by (o_1, i_1, …, o_d, i_d), is a tensor train
(the TT-matrix format):

    ΔW[(o_1…o_d), (i_1…i_d)] = alpha · G_1[:, o_1, i_1, :] G_2[:, o_2, i_2, :] ⋯ G_d[:, o_d, i_d, :]

with cores G_k of shape (r_{k-1}, o_k, i_k, r_k), r_0 = r_d = 1 and inner ranks ``tt_rank``; row and
column indices are row-major in their factors, so reshaping gives W's own (out, in) shape. A layer
stores Σ_k r_{k-1} o_k i_k r_k numbers, far fewer than LoRA's r(out + in). The last core starts at zero,
so the model is unchanged at init (the others are Gaussian). The forward builds ΔW from the cores and
applies it (one out×in matrix per layer and step, like a merge). PEFT has no LoRETTA; the file keeps
the cores as ``loretta_cores.<k>``.
"""

from __future__ import annotations

import math
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from tuneforge.adapters.layer import LayerAdapter
from tuneforge.adapters.lora import is_transposed, refuse_quantized_merge, weight_shape
from tuneforge.adapters.vera import PeftFlags


class LorettaConfig(PeftFlags):
    """LoRETTA_rep: ΔW as a tensor train of ``num_cores`` cores with inner rank ``tt_rank``, scaled by ``alpha``."""

    method: Literal["loretta"] = "loretta"
    tt_rank: int = Field(4, gt=0)
    num_cores: int = Field(3, ge=2)
    alpha: float = Field(1.0, gt=0)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)

    peft_type: ClassVar[str | None] = None


def prime_factors(n: int) -> list[int]:
    factors, p = [], 2
    while p * p <= n:
        while n % p == 0:
            factors.append(p)
            n //= p
        p += 1
    return factors + ([n] if n > 1 else [])


def balanced_factors(n: int, parts: int) -> list[int]:
    """``parts`` integers multiplying to n, as equal as greedy assignment of prime factors makes them
    (largest prime to the smallest part; 1s where n has too few factors), largest first."""
    buckets = [1] * parts
    for prime in sorted(prime_factors(n), reverse=True):
        buckets[buckets.index(min(buckets))] *= prime
    return sorted(buckets, reverse=True)


def tt_ranks(tt_rank: int, num_cores: int) -> list[int]:
    return [1] + [tt_rank] * (num_cores - 1) + [1]


def tt_to_matrix(cores: list[torch.Tensor]) -> torch.Tensor:
    """Contract cores (r_{k-1}, o_k, i_k, r_k) into the (Π o_k, Π i_k) matrix, factors row-major."""
    full = cores[0].squeeze(0)  # (o_1, i_1, r_1)
    for core in cores[1:]:
        rows, cols, _ = full.shape
        full = torch.einsum("OIr,rois->OoIis", full, core)
        full = full.reshape(rows * core.shape[1], cols * core.shape[2], core.shape[3])
    return full.squeeze(-1)


class LorettaLinear(LayerAdapter):
    """LoRETTA_rep on a Linear or Conv1D layer."""

    def __init__(self, in_features: int, out_features: int, config: LorettaConfig, transposed: bool):
        super().__init__()
        self.transposed = transposed
        self.alpha = config.alpha
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.out_factors = balanced_factors(out_features, config.num_cores)
        self.in_factors = balanced_factors(in_features, config.num_cores)
        ranks = tt_ranks(config.tt_rank, config.num_cores)
        cores = []
        for k, (o, i) in enumerate(zip(self.out_factors, self.in_factors)):
            shape = (ranks[k], o, i, ranks[k + 1])
            if k == config.num_cores - 1:
                cores.append(nn.Parameter(torch.zeros(shape)))
            else:  # each core maps a unit input to unit-size output in expectation, as LoRA's A does
                cores.append(nn.Parameter(torch.randn(shape) / math.sqrt(ranks[k] * i)))
        self.loretta_cores = nn.ParameterList(cores)

    def update(self) -> torch.Tensor:
        return tt_to_matrix(list(self.loretta_cores)) * self.alpha  # (out, in)

    def transform_output(self, x, out, base_layer):
        delta = self.update()
        return out + F.linear(self.dropout(x).to(delta.dtype), delta).to(out.dtype)

    def delta_weight(self, base_layer) -> torch.Tensor:
        delta = self.update()
        return delta.T if self.transposed else delta

    def merge(self, base_layer, safe):
        refuse_quantized_merge(base_layer)
        super().merge(base_layer, safe)

    def file_tensors(self):
        return {f"loretta_cores.{k}": core for k, core in enumerate(self.loretta_cores)}


def build_loretta(base_layer: nn.Module, config: LorettaConfig, module_name: str) -> LorettaLinear:
    in_features, out_features = weight_shape(base_layer)
    return LorettaLinear(in_features, out_features, config, is_transposed(base_layer))
