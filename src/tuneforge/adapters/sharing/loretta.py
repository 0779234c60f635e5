"""LoRETTA_rep (Yang, Zhou, Wong & Zhang 2024, "LoRETTA: Low-Rank Economic Tensor-Train Adaptation for
Ultra-Low-Parameter Fine-Tuning of Large Language Models", NAACL 2024, arXiv:2402.11417; Section 3, LoRETTA_rep).

LoRA's update with each of its two factors stored as a tensor train::

    h = W x + (alpha / r) · B A x        A: (in → r), B: (r → out)

A's in·r entries, seen as a tensor of shape (n_1, …, n_d) (n_1⋯n_d = in·r, row-major over A's
(in, r) layout, as the official code reshapes it), are a tensor train of cores G_k of shape
(r_{k-1}, n_k, r_k) with r_0 = r_d = 1 and inner ranks ``tt_rank``; B's r·out entries likewise, over
its (r, out) layout. A factor stores Σ_k r_{k-1} n_k r_k numbers (the paper's parameter count), so a
768×768 layer with r = 8, tt_rank = 5 and 4 cores trains 2 × 500 = 1,000 numbers where LoRA trains
8 · (768 + 768) = 12,288. Only the two small factors are rebuilt each forward, never ΔW.

Reference code vs ours (github.com/yifanycc/loretta, ``loretta_rep.py``): the official code picks each
factor's tensor shape from a hand-written table per hidden size; we split in·r and r·out into
``num_cores`` factors as balanced as their prime factors allow (for 768·8 that is (12, 8, 8, 8), the
table has (8, 8, 12, 8)). It initialises every core Gaussian, so ΔW ≠ 0 at the start; we draw the
same Gaussian cores (each scaled so the contracted factor has entries of standard deviation
1/sqrt(in + out) as there) but zero B's last core, so the model is unchanged at init as with LoRA.
LoRETTA_adp (tensorised bottleneck adapters) is not implemented.

PEFT has no LoRETTA; the file keeps the cores as ``loretta_A.<k>`` and ``loretta_B.<k>``.
"""

from __future__ import annotations

import math
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from tuneforge.adapters.layer import LayerAdapter
from tuneforge.adapters.lora.lora import check_rank, is_transposed, refuse_quantized_merge, weight_shape
from tuneforge.adapters.sharing.vera import PeftFlags


class LorettaConfig(PeftFlags):
    """LoRETTA_rep: LoRA of rank ``r`` scaled by alpha/r, each factor a tensor train of ``num_cores`` cores."""

    method: Literal["loretta"] = "loretta"
    r: int = Field(8, gt=0, description="rank of the LoRA update B A")
    alpha: float = Field(16.0, gt=0, description="the update is scaled by alpha / r, as LoRA's")
    tt_rank: int = Field(5, gt=0, description="inner rank of each factor's tensor train (official default 5)")
    num_cores: int = Field(4, ge=2, description="cores per factor (the length of its tensor shape)")
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


def tt_to_tensor(cores: list[torch.Tensor]) -> torch.Tensor:
    """Contract cores (r_{k-1}, n_k, r_k) into the flat (n_1⋯n_d,) vector, row-major in (n_1, …, n_d)."""
    full = cores[0].reshape(cores[0].shape[1], cores[0].shape[2])  # (n_1, r_1)
    for core in cores[1:]:
        full = (full @ core.reshape(core.shape[0], -1)).reshape(-1, core.shape[2])  # (n_1⋯n_k, r_k)
    return full.reshape(-1)


class TensorTrainFactor(nn.Module):
    """One (rows, cols) matrix stored as a tensor train over its row-major entries."""

    def __init__(self, rows: int, cols: int, tt_rank: int, num_cores: int, target_std: float, zero_last: bool):
        super().__init__()
        self.rows, self.cols = rows, cols
        self.shape = balanced_factors(rows * cols, num_cores)
        ranks = tt_ranks(tt_rank, num_cores)
        # A product of d cores with entries N(0, σ²/r_k) has entries of std Π σ; σ = target^(1/d).
        per_core = target_std ** (1 / num_cores)
        cores = [torch.randn(ranks[k], n, ranks[k + 1]) * per_core / math.sqrt(ranks[k])
                 for k, n in enumerate(self.shape)]
        if zero_last:
            cores[-1].zero_()
        self.cores = nn.ParameterList(nn.Parameter(core) for core in cores)

    def matrix(self) -> torch.Tensor:
        return tt_to_tensor(list(self.cores)).reshape(self.rows, self.cols)


class LorettaLinear(LayerAdapter):
    """LoRETTA_rep on a Linear or Conv1D layer."""

    def __init__(self, in_features: int, out_features: int, config: LorettaConfig, transposed: bool):
        super().__init__()
        self.transposed = transposed
        self.scaling = config.alpha / config.r
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        target_std = 1 / math.sqrt(in_features + out_features)  # the official code's target
        self.loretta_A = TensorTrainFactor(in_features, config.r, config.tt_rank, config.num_cores, target_std,
                                           zero_last=False)  # (in, r)
        self.loretta_B = TensorTrainFactor(config.r, out_features, config.tt_rank, config.num_cores, target_std,
                                           zero_last=True)  # (r, out)

    def transform_output(self, x, out, base_layer):
        down = self.loretta_A.matrix()  # (in, r)
        up = self.loretta_B.matrix()  # (r, out)
        x = self.dropout(x).to(down.dtype)
        return out + ((x @ down) @ up * self.scaling).to(out.dtype)

    def delta_weight(self, base_layer) -> torch.Tensor:
        delta = (self.loretta_A.matrix() @ self.loretta_B.matrix()).T * self.scaling  # (out, in)
        return delta.T if self.transposed else delta

    def merge(self, base_layer, safe):
        refuse_quantized_merge(base_layer)
        super().merge(base_layer, safe)

    def file_tensors(self):
        cores = {f"loretta_A.{k}": core for k, core in enumerate(self.loretta_A.cores)}
        cores.update({f"loretta_B.{k}": core for k, core in enumerate(self.loretta_B.cores)})
        return cores

    def parameter_roles(self):
        return {"loretta_A": list(self.loretta_A.cores), "loretta_B": list(self.loretta_B.cores)}


def build_loretta(base_layer: nn.Module, config: LorettaConfig, module_name: str) -> LorettaLinear:
    in_features, out_features = weight_shape(base_layer)
    check_rank(config.r, in_features, out_features, module_name)
    return LorettaLinear(in_features, out_features, config, is_transposed(base_layer))
