"""VB-LoRA (Li et al. 2024): every sub-vector of every LoRA factor is a top-k mixture from one bank.

Paper: Li et al., "VB-LoRA: Extreme Parameter Efficient Fine-Tuning with Vector Banks", NeurIPS 2024,
arXiv:2405.15179; implements the top-k admixture of its method section (written out below), with PEFT's
parameter layout.

The adapter owns one trainable vector bank V (num_vectors, L), shared by all its layers. A layer's A
(r, in) is cut into r · in/L sub-vectors of length L and B (out, r) into out/L · r; each sub-vector
has its own logits over the bank, keeps the top-k of them and mixes those bank vectors with the
softmax of the kept logits (a differentiable top-k: gradients reach the selected logits and
vectors):

    a_{i,j} = Σ_{t ∈ topk(ℓ_{i,j})} softmax(ℓ_{i,j})_t · V_t,    ΔW = B A

Layout (PEFT's, so files move both ways): ``vblora_logits_A`` (r, in/L, n) whose row i concatenates
into A[i]; ``vblora_logits_B`` (out/L, r, n) where B[o·L:(o+1)·L, i] is the sub-vector (o, i); the bank
is the model-level ``base_model.vblora_vector_bank``. With ``save_only_topk_weights`` the file keeps
only each sub-vector's top-k indices and its first k-1 mixing weights (inference only, as in PEFT).
As in the paper and PEFT, ΔW ≠ 0 at init (random logits, small random bank).
"""

from __future__ import annotations

import math
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

LOGIT_LEAVES = ("vblora_logits_A", "vblora_logits_B")


class VbLoraConfig(SharedGroupConfig, PeftFlags):
    """VB-LoRA: rank ``r``; a bank of ``num_vectors`` vectors of length ``vector_length`` (which must
    divide every targeted layer's in and out features); ``topk`` bank vectors per sub-vector."""

    method: Literal["vb-lora"] = "vb-lora"
    r: int = Field(4, gt=0)
    num_vectors: int = Field(256, gt=0)
    vector_length: int = Field(256, gt=0)
    topk: int = Field(2, gt=0)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    save_only_topk_weights: bool = False
    init_vector_bank_bound: float = Field(0.02, gt=0)
    init_logits_std: float = Field(0.1, gt=0)

    peft_type: ClassVar[str] = "VBLORA"
    peft_field_names: ClassVar[dict[str, str]] = {"dropout": "vblora_dropout"}

    @model_validator(mode="after")
    def _topk_within_bank(self):
        if self.topk > self.num_vectors:
            raise ValueError(f"topk={self.topk} exceeds num_vectors={self.num_vectors}; lower topk")
        return self


class VectorBank(LayerGroup, nn.Module):
    """One adapter's trainable bank; a submodule of each of its layer adapters (one module, moved once)."""

    def __init__(self, num_vectors: int, vector_length: int, bound: float):
        nn.Module.__init__(self)
        LayerGroup.__init__(self)
        self.vblora_vector_bank = nn.Parameter(torch.empty(num_vectors, vector_length).uniform_(-bound, bound))
        self._loaded_from: torch.Tensor | None = None  # held, not its id (ids are reused): copy once per file

    def load(self, bank: torch.Tensor) -> None:
        if self._loaded_from is not bank:
            with torch.no_grad():
                self.vblora_vector_bank.copy_(bank)
            self._loaded_from = bank


def mix_top_k(logits: torch.Tensor, bank: torch.Tensor, k: int) -> torch.Tensor:
    """(..., n) logits over a (n, L) bank -> (..., L): the softmax-weighted sum of the top-k vectors."""
    kept, indices = logits.topk(k, dim=-1)  # (..., k)
    weights = F.softmax(kept, dim=-1)
    return torch.einsum("...k,...kl->...l", weights, bank[indices])


def index_dtype(num_vectors: int) -> torch.dtype:
    """The smallest integer type PEFT uses for stored top-k indices."""
    if num_vectors < 2**8:
        return torch.uint8
    if num_vectors < 2**15:
        return torch.int16
    return torch.int32 if num_vectors < 2**31 else torch.int64


class VbLoraLinear(LayerAdapter):
    """VB-LoRA on a Linear or Conv1D layer."""

    def __init__(self, bank: VectorBank, in_features: int, out_features: int, config: VbLoraConfig,
                 transposed: bool, owns_bank: bool):
        super().__init__()
        self.bank = bank
        self.owns_bank = owns_bank  # exactly one layer reports the bank to the optimizer
        self.topk = config.topk
        self.save_only_topk_weights = config.save_only_topk_weights
        self.from_top_k_file = False  # logits outside the stored top-k are gone: serve and merge only
        self.transposed = transposed
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        length, n = config.vector_length, config.num_vectors
        self.vblora_logits_A = nn.Parameter(torch.randn(config.r, in_features // length, n) * config.init_logits_std)
        self.vblora_logits_B = nn.Parameter(torch.randn(out_features // length, config.r, n) * config.init_logits_std)

    def train(self, mode: bool = True):
        self.bank.sealed = True  # add_adapter has built every layer of this adapter
        return super().train(mode)

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """A (r, in) and B (out, r) composed from the bank."""
        bank = self.bank.vblora_vector_bank
        r = self.vblora_logits_A.shape[0]
        lora_a = mix_top_k(self.vblora_logits_A, bank, self.topk).reshape(r, -1)  # (r, in/L, L) -> (r, in)
        sub_b = mix_top_k(self.vblora_logits_B, bank, self.topk)  # (out/L, r, L)
        lora_b = sub_b.transpose(1, 2).reshape(-1, r)  # (out/L, L, r) -> (out, r)
        return lora_a, lora_b

    def transform_output(self, x, out, base_layer):
        if self.from_top_k_file and self.training and self.vblora_logits_A.requires_grad:
            raise AdapterError(
                "this VB-LoRA adapter was loaded from a save_only_topk_weights=true file, which keeps only each "
                "sub-vector's top-k logits: it can serve and merge but not train (a resumed run would differ "
                "from an uninterrupted one). Train with save_only_topk_weights=false and switch it on for export."
            )
        lora_a, lora_b = self.factors()
        x = self.dropout(x).to(lora_a.dtype)
        return out + F.linear(F.linear(x, lora_a), lora_b).to(out.dtype)

    def delta_weight(self, base_layer) -> torch.Tensor:
        lora_a, lora_b = self.factors()
        delta = lora_b @ lora_a  # (out, in)
        return delta.T if self.transposed else delta

    def merge(self, base_layer, safe):
        refuse_quantized_merge(base_layer)
        super().merge(base_layer, safe)

    def file_tensors(self):
        if not self.save_only_topk_weights:
            return {leaf: getattr(self, leaf) for leaf in LOGIT_LEAVES}
        stored = {}
        for leaf in LOGIT_LEAVES:
            kept, indices = getattr(self, leaf).detach().topk(self.topk, dim=-1)
            stored[f"{leaf}_topk_indices"] = indices.to(index_dtype(self.bank.vblora_vector_bank.shape[0]))
            stored[f"{leaf}_topk_weights"] = F.softmax(kept, dim=-1)[..., :-1].contiguous()
        return stored

    def load_file_tensors(self, tensors: dict[str, torch.Tensor], where: str) -> None:
        if self.save_only_topk_weights:
            tensors = {leaf: self._logits_from_top_k(tensors, leaf, where) for leaf in LOGIT_LEAVES}
            self.from_top_k_file = True
        for leaf in LOGIT_LEAVES:
            target = getattr(self, leaf)
            value = tensors.get(leaf)
            if value is None or value.shape != target.shape:
                found = "missing" if value is None else f"shape {tuple(value.shape)}"
                raise AdapterError(
                    f"tensor '{where}.{leaf}' is {found} in the adapter file, expected {tuple(target.shape)}: "
                    "the adapter was made for a different base model, target_modules, r, num_vectors or "
                    "vector_length. Load it onto the model and config it was trained with."
                )
            with torch.no_grad():
                target.copy_(value.to(target.dtype))

    def _logits_from_top_k(self, tensors: dict[str, torch.Tensor], leaf: str, where: str) -> torch.Tensor:
        """Logits whose top-k softmax reproduces the stored mixing weights: log w at the kept indices,
        -inf elsewhere (the last weight is 1 minus the others)."""
        indices, weights = tensors.get(f"{leaf}_topk_indices"), tensors.get(f"{leaf}_topk_weights")
        if indices is None or weights is None:
            raise AdapterError(f"adapter file has no '{where}.{leaf}_topk_indices'/'_topk_weights' although "
                               "adapter_config.json says save_only_topk_weights=true")
        weights = torch.cat([weights, 1 - weights.sum(dim=-1, keepdim=True)], dim=-1)
        target = getattr(self, leaf)
        logits = torch.full(target.shape, -math.inf, device=target.device)
        return logits.scatter(-1, indices.long().to(target.device), weights.log().to(target.device))

    def shared_file_tensors(self) -> dict[str, torch.Tensor]:
        return {"vblora_vector_bank": self.bank.vblora_vector_bank}

    def load_shared_file_tensors(self, tensors: dict[str, torch.Tensor], path: Path) -> set[str]:
        bank = tensors.get("vblora_vector_bank")
        expected = tuple(self.bank.vblora_vector_bank.shape)
        if bank is None or tuple(bank.shape) != expected:
            found = "missing" if bank is None else f"of shape {tuple(bank.shape)}"
            raise AdapterError(f"{path}: 'base_model.vblora_vector_bank' is {found}; this config needs "
                               f"{expected} (num_vectors, vector_length)")
        self.bank.load(bank)
        return {"vblora_vector_bank"}

    def parameter_roles(self):
        roles = {"vblora_logits": [self.vblora_logits_A, self.vblora_logits_B]}
        if self.owns_bank:
            roles["vector_bank"] = [self.bank.vblora_vector_bank]
        return roles


def build_vb_lora(base_layer: nn.Module, config: VbLoraConfig, module_name: str) -> VbLoraLinear:
    in_features, out_features = weight_shape(base_layer)
    check_rank_fits(config.r, in_features, out_features, module_name)
    for side, size in (("in_features", in_features), ("out_features", out_features)):
        if size % config.vector_length:
            divisors = [d for d in range(1, size + 1) if size % d == 0 and d <= config.vector_length]
            raise AdapterError(
                f"vector_length={config.vector_length} does not divide {side}={size} of '{module_name}': every "
                f"sub-vector must be a whole bank vector. Use a vector_length dividing all targeted layers' sizes "
                f"(e.g. {divisors[-1]}), or leave this module out (exclude_modules)."
            )
    bank = layer_group(config, module_name, lambda: VectorBank(config.num_vectors, config.vector_length,
                                                               config.init_vector_bank_bound))
    owns_bank = len(bank.module_names) == 1  # the group's first layer
    return VbLoraLinear(bank, in_features, out_features, config, is_transposed(base_layer), owns_bank)
