"""BOFT: orthogonal finetuning with butterfly factorisation (Liu et al. 2024).

Paper: Liu et al., "Parameter-Efficient Orthogonal Finetuning via Butterfly Factorization", ICLR 2024,
arXiv:2311.06243; implements the butterfly-factorised orthogonal matrix of its method section (written out
below) with PEFT's layout, including PEFT's learned output scale ``boft_s``.

OFT's block-diagonal multiplier only mixes features inside a block. BOFT multiplies m sparse
orthogonal factors; factor i is block-diagonal (blocks of size b, Cayley transforms as in OFT)
seen through a butterfly permutation P_i, so after m factors each feature can reach b·2^(m-1)
others. With PEFT's file layout (``boft_R`` (m, n, b, b) unconstrained, its skew part used;
``boft_s`` (out, 1) a learned output scale)::

    M_i = P_i diag(R_i1, ..., R_in) P_iᵀ,   R_ij = cayley((S - Sᵀ) / 2)
    B   = M_m ⋯ M_2 M_1                     (the input row x becomes x B)
    y   = s ⊙ (W Bᵀ x) + bias

P_i permutes within chunks of b·2^i features: the chunk is cut into groups of b/2 and the
even-numbered groups move before the odd-numbered ones (P_1 = I). m = 1 is OFT with a scale.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from tuneforge.adapters.config import AdapterConfig
from tuneforge.adapters.layer import LayerAdapter
from tuneforge.adapters.lora.lora import is_transposed, weight_shape
from tuneforge.adapters.orthogonal.oft import MultiplicativeAdapter, apply_without_bias, block_dropout, cayley, check_block_split
from tuneforge.errors import AdapterError


class BoftConfig(AdapterConfig):
    """BOFT: give ``boft_block_size`` or ``boft_block_num`` (the other 0); ``boft_n_butterfly_factor``
    is the number of butterfly factors (1 = OFT)."""

    method: Literal["boft"] = "boft"
    boft_block_size: int = Field(4, ge=0)
    boft_block_num: int = Field(0, ge=0)
    boft_n_butterfly_factor: int = Field(1, ge=1)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    init_weights: bool = True
    fan_in_fan_out: bool = False
    bias: Literal["none"] = "none"

    peft_type: ClassVar[str] = "BOFT"
    peft_field_names: ClassVar[dict[str, str]] = {"dropout": "boft_dropout"}

    @model_validator(mode="before")
    @classmethod
    def _block_num_replaces_default_size(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("boft_block_num") and "boft_block_size" not in data:
            data = {**data, "boft_block_size": 0}
        return data

    @model_validator(mode="after")
    def _exactly_one_size(self):
        if (self.boft_block_size == 0) == (self.boft_block_num == 0):
            raise ValueError(
                "give exactly one of boft_block_size and boft_block_num, the other being 0; got "
                f"boft_block_size={self.boft_block_size}, boft_block_num={self.boft_block_num}"
            )
        return self

    def block_size_for(self, in_features: int, module_name: str) -> int:
        if self.boft_block_size:
            check_block_split(in_features, self.boft_block_size, module_name, "boft_block_size")
            block_size = self.boft_block_size
        else:
            check_block_split(in_features, self.boft_block_num, module_name, "boft_block_num")
            block_size = in_features // self.boft_block_num
        self._check_butterfly(in_features, block_size, module_name)
        return block_size

    def _check_butterfly(self, in_features: int, block_size: int, module_name: str) -> None:
        factors = self.boft_n_butterfly_factor
        if factors == 1:
            return
        span = 2 ** (factors - 1)
        if block_size % 2 or in_features % (block_size * span):
            valid = [b for b in range(2, in_features + 1, 2) if in_features % (b * span) == 0]
            raise AdapterError(
                f"boft_n_butterfly_factor={factors} needs an even block size b with b·{span} dividing "
                f"in_features={in_features} of '{module_name}'; got b={block_size}. Valid block sizes: "
                f"{valid or 'none (lower boft_n_butterfly_factor)'}"
            )


def butterfly_permutation(features: int, block_size: int, factor: int) -> torch.Tensor:
    """Indices p with (P v)[a] = v[p[a]] for butterfly factor ``factor`` (0-based)."""
    chunk, half = block_size * 2**factor, block_size // 2
    groups = torch.arange(chunk // half)
    order = torch.cat([groups[0::2], groups[1::2]])
    within = (order[:, None] * half + torch.arange(half)).flatten()
    return (torch.arange(0, features, chunk)[:, None] + within).flatten()


class BoftLinear(MultiplicativeAdapter):
    def __init__(self, in_features: int, out_features: int, block_size: int, config: BoftConfig, transposed: bool):
        super().__init__(transposed, has_input_side=True)
        self.factors = config.boft_n_butterfly_factor
        self.dropout = config.dropout
        num_blocks = in_features // block_size
        self.boft_R = nn.Parameter(torch.zeros(self.factors, num_blocks, block_size, block_size))  # (m, n, b, b)
        self.boft_s = nn.Parameter(torch.ones(out_features, 1))  # (out, 1)
        if not config.init_weights:
            nn.init.normal_(self.boft_R, std=0.1)
            nn.init.normal_(self.boft_s, mean=1.0, std=0.1)
        identity = torch.arange(in_features)
        perms = [butterfly_permutation(in_features, block_size, i) if self.factors > 1 else identity
                 for i in range(self.factors)]
        self.register_buffer("permutations", torch.stack(perms), persistent=False)  # (m, in)

    def factor_blocks(self) -> torch.Tensor:
        """(m, n, b, b) orthogonal blocks of every factor."""
        skew = 0.5 * (self.boft_R - self.boft_R.transpose(-1, -2))
        blocks = cayley(skew.flatten(0, 1)).view_as(skew)
        if self.training and self.dropout > 0:
            # As in the paper's multiplicative dropout: some blocks of one random factor become I.
            chosen = int(torch.randint(self.factors, ()))
            blocks = torch.cat([blocks[:chosen], block_dropout(blocks[chosen], self.dropout)[None],
                                blocks[chosen + 1:]])
        return blocks

    def butterfly_matrix(self) -> torch.Tensor:
        """B = M_m ⋯ M_1 (in, in); the input row x becomes x B."""
        product = None
        for blocks, perm in zip(self.factor_blocks(), self.permutations):
            factor = torch.block_diag(*blocks)[perm][:, perm]  # P diag(R) Pᵀ
            product = factor if product is None else factor @ product
        return product

    def input_matrix(self) -> torch.Tensor:
        return self.butterfly_matrix().T

    def output_matrix(self) -> torch.Tensor:
        return torch.diag(self.boft_s[:, 0])

    def transform_input(self, x, base_layer):
        butterfly = self.butterfly_matrix()
        return (x.to(butterfly.dtype) @ butterfly).to(x.dtype)

    def transform_output(self, x, out, base_layer):
        return apply_without_bias(out, base_layer, lambda y: y * self.boft_s[:, 0])

    def file_tensors(self):
        return {"boft_R": self.boft_R, "boft_s": self.boft_s}

    def load_file_tensors(self, tensors, where):
        stored = tensors.get("boft_R")
        if stored is not None and stored.dim() == 4 and stored.shape[0] != self.factors:
            raise AdapterError(
                f"tensor '{where}.boft_R' holds {stored.shape[0]} butterfly factor(s) but the config asks for "
                f"boft_n_butterfly_factor={self.factors}. peft without its CUDA extension silently trains with one "
                f"factor while writing the configured value; set \"boft_n_butterfly_factor\": {stored.shape[0]} in "
                "adapter_config.json"
            )
        super().load_file_tensors(tensors, where)


def build_boft(base_layer: nn.Module, config: BoftConfig, module_name: str) -> LayerAdapter:
    if isinstance(base_layer, nn.Embedding):
        raise AdapterError(f"BOFT on the Embedding '{module_name}' is not supported; target Linear layers only")
    in_features, out_features = weight_shape(base_layer)
    block_size = config.block_size_for(in_features, module_name)
    return BoftLinear(in_features, out_features, block_size, config, is_transposed(base_layer))
