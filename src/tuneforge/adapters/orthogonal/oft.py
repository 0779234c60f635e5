"""OFT: orthogonal finetuning (Qiu et al. 2023), and the multiplicative-adapter base it shares.

Paper: Qiu et al., "Controlling Text-to-Image Diffusion by Orthogonal Finetuning", NeurIPS 2023,
arXiv:2306.07280; implements its constrained orthogonal update, W' = R W with a block-diagonal R from the
Cayley parametrisation of its method section. The paper writes R = (I + Q)(I − Q)⁻¹; PEFT (and this module)
use (I − Q)(I + Q)⁻¹, the same family with Q negated, so that files match PEFT's.

OFT keeps the frozen weight's hyperspherical energy by multiplying it with an orthogonal matrix
instead of adding a delta. The multiplier is block-diagonal; each block is the Cayley transform
of a skew-symmetric matrix Q, stored as its strict upper triangle (PEFT's ``oft_R.weight``)::

    R_b = (I - Q_b)(I + Q_b)⁻¹          (orthogonal; Q_b = 0 gives I, so identity at init)
    y   = W Rᵀ x + bias,  R = diag(R_1, ..., R_n)      (PEFT rotates the row vector: x ↦ x R)

``use_cayley_neumann`` replaces the inverse by PEFT 0.21's truncated Neumann series, which
approximates (I + Q)(I - Q)⁻¹ (the Cayley transform of -Q) and is only nearly orthogonal; we follow
it exactly so files move both ways. COFT (``coft``) keeps each ‖Q_b‖_F ≤ eps / √(stored blocks).
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from tuneforge.adapters.config import AdapterConfig
from tuneforge.adapters.layer import LayerAdapter
from tuneforge.adapters.lora.lora import is_transposed, refuse_quantized_merge, weight_shape
from tuneforge.errors import AdapterError


class MultiplicativeAdapter(LayerAdapter):
    """A method that multiplies the frozen weight instead of adding to it: W' = L W M.

    Subclasses return M (acting on the layer's input, ``input_matrix``) and/or L (acting on its
    output, ``output_matrix``); either may be None. The bias is left as it is. Merging writes
    L W M into the weight; unmerging multiplies by the inverses, so it does not need a copy of W.
    """

    def __init__(self, transposed: bool, has_input_side: bool):
        super().__init__()
        self.transposed = transposed
        # Output-only adapters keep per-row batching available (it refuses input transforms).
        self.modifies_input = has_input_side

    def input_matrix(self) -> torch.Tensor | None:
        """M (in, in), or None when the method leaves the input alone."""
        return None

    def output_matrix(self) -> torch.Tensor | None:
        """L (out, out), or None when the method leaves the output alone."""
        return None

    def transform_input(self, x, base_layer):
        right = self.input_matrix()
        if right is None:
            return x
        return (x.to(right.dtype) @ right.T).to(x.dtype)

    def transform_output(self, x, out, base_layer):
        left = self.output_matrix()
        if left is None:
            return out
        return apply_without_bias(out, base_layer, lambda y: y @ left.T)

    def delta_weight(self, base_layer) -> torch.Tensor:
        weight = out_in_weight(base_layer, self.transposed)
        delta = self.multiplied(weight, self.output_matrix(), self.input_matrix()) - weight
        return delta.T if self.transposed else delta

    @staticmethod
    def multiplied(weight: torch.Tensor, left: torch.Tensor | None, right: torch.Tensor | None) -> torch.Tensor:
        if left is not None:
            weight = left.to(weight.dtype) @ weight
        if right is not None:
            weight = weight @ right.to(weight.dtype)
        return weight

    def merge(self, base_layer, safe):
        refuse_quantized_merge(base_layer)
        with torch.no_grad():
            super().merge(base_layer, safe)

    def unmerge(self, base_layer):
        with torch.no_grad():
            weight = out_in_weight(base_layer, self.transposed).double()
            left, right = self.output_matrix(), self.input_matrix()
            left = None if left is None else torch.linalg.inv(left.double())
            right = None if right is None else torch.linalg.inv(right.double())
            restored = self.multiplied(weight, left, right)
            base_layer.weight.data.copy_((restored.T if self.transposed else restored).to(base_layer.weight.dtype))


def out_in_weight(base_layer: nn.Module, transposed: bool) -> torch.Tensor:
    """The weight as (out, in) float32, whatever the layer stores (GPT-2's Conv1D keeps (in, out))."""
    weight = base_layer.weight.detach().float()
    return weight.T if transposed else weight


def apply_without_bias(out: torch.Tensor, base_layer: nn.Module, transform) -> torch.Tensor:
    """transform(W x) + bias: an output-side multiplier acts on W only, never on the bias."""
    bias = getattr(base_layer, "bias", None)
    dtype = out.dtype
    out = out.float()
    if bias is None:
        return transform(out).to(dtype)
    return (transform(out - bias.float()) + bias.float()).to(dtype)


def check_block_split(features: int, block_size: int, module_name: str, key: str, side: str = "in_features") -> None:
    """A block size must divide the dimension it splits; the message lists the sizes that would."""
    if block_size <= 0 or features % block_size:
        valid = [d for d in range(1, features + 1) if features % d == 0]
        raise AdapterError(
            f"{key}={block_size} does not divide {side}={features} of '{module_name}'; "
            f"valid values for this layer: {valid}. Pick one of them (or exclude the module)."
        )


def skew_from_upper(packed: torch.Tensor, size: int) -> torch.Tensor:
    """(n, size(size-1)/2) strict upper triangles, row-major -> (n, size, size) skew-symmetric Q."""
    rows, cols = torch.triu_indices(size, size, 1, device=packed.device)
    upper = packed.new_zeros(packed.shape[0], size, size)
    upper[:, rows, cols] = packed
    return upper - upper.transpose(-1, -2)


def cayley(q: torch.Tensor) -> torch.Tensor:
    """(I - Q)(I + Q)⁻¹ for a batch of skew-symmetric Q (n, b, b); the factors commute."""
    eye = torch.eye(q.shape[-1], dtype=q.dtype, device=q.device)
    return torch.linalg.solve(eye + q, eye - q)


def cayley_neumann(q: torch.Tensor, terms: int) -> torch.Tensor:
    """PEFT 0.21's series for (I + Q)(I - Q)⁻¹: I + 2Q + 2Q² + ... + 2Q^(m-1) + Q^m, m = max(3, terms - 1)
    (terms = 1 gives I, terms = 2 gives I + 2Q)."""
    eye = torch.eye(q.shape[-1], dtype=q.dtype, device=q.device).expand_as(q)
    if terms == 1:
        return eye.clone()
    result = eye + 2 * q
    if terms == 2:
        return result
    power = q
    for _ in range(2, max(3, terms - 1)):
        power = power @ q
        result = result + 2 * power
    return result + power @ q


def block_dropout(blocks: torch.Tensor, p: float) -> torch.Tensor:
    """OFT's multiplicative dropout: int(p · n) random blocks of (n, b, b) become the identity."""
    count = int(p * blocks.shape[0])
    if count == 0:
        return blocks
    dropped = torch.zeros(blocks.shape[0], 1, 1, dtype=blocks.dtype, device=blocks.device)
    dropped[torch.randperm(blocks.shape[0], device=blocks.device)[:count]] = 1
    eye = torch.eye(blocks.shape[-1], dtype=blocks.dtype, device=blocks.device)
    return blocks * (1 - dropped) + eye * dropped


class OftConfig(AdapterConfig):
    """OFT: give either ``r`` (blocks per layer) or ``oft_block_size`` (the other is inferred).

    ``block_share`` trains one block shared by all blocks of a layer; ``coft`` bounds each block's
    skew matrix (COFT); ``dropout`` turns random blocks into the identity while training.
    """

    method: Literal["oft"] = "oft"
    r: int = Field(0, ge=0)
    oft_block_size: int = Field(32, ge=0)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    coft: bool = False
    eps: float = Field(6e-5, gt=0)
    block_share: bool = False
    use_cayley_neumann: bool = False
    num_cayley_neumann_terms: int = Field(5, ge=1)
    init_weights: bool = True
    fan_in_fan_out: bool = False
    bias: Literal["none"] = "none"

    peft_type: ClassVar[str] = "OFT"
    peft_field_names: ClassVar[dict[str, str]] = {"dropout": "module_dropout"}

    @model_validator(mode="before")
    @classmethod
    def _r_replaces_default_block_size(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("r") and "oft_block_size" not in data:
            data = {**data, "oft_block_size": 0}
        return data

    @model_validator(mode="after")
    def _exactly_one_size(self):
        if (self.r == 0) == (self.oft_block_size == 0):
            raise ValueError(
                f"give exactly one of r (blocks per layer) and oft_block_size, the other being 0; "
                f"got r={self.r}, oft_block_size={self.oft_block_size}"
            )
        return self

    def block_size_for(self, in_features: int, module_name: str) -> int:
        if self.oft_block_size:
            check_block_split(in_features, self.oft_block_size, module_name, "oft_block_size")
            return self.oft_block_size
        check_block_split(in_features, self.r, module_name, "r")
        return in_features // self.r


class OftLinear(MultiplicativeAdapter):
    """OFT on a Linear or Conv1D layer: the input is rotated block by block before the base layer."""

    def __init__(self, in_features: int, block_size: int, config: OftConfig, transposed: bool):
        super().__init__(transposed, has_input_side=True)
        self.block_size = block_size
        self.num_blocks = in_features // block_size
        self.block_share = config.block_share
        self.coft, self.eps = config.coft, config.eps
        self.use_cayley_neumann = config.use_cayley_neumann
        self.num_cayley_neumann_terms = config.num_cayley_neumann_terms
        self.dropout = config.dropout
        stored = 1 if config.block_share else self.num_blocks
        self.oft_R = nn.Parameter(torch.zeros(stored, block_size * (block_size - 1) // 2))  # (n, b(b-1)/2)
        if not config.init_weights:
            nn.init.normal_(self.oft_R, std=0.1)

    def rotation_blocks(self) -> torch.Tensor:
        """(num_blocks, b, b) blocks R_b; the input row x becomes x R block by block."""
        packed = self.constrained(self.oft_R) if self.coft else self.oft_R
        q = skew_from_upper(packed, self.block_size)
        blocks = cayley_neumann(q, self.num_cayley_neumann_terms) if self.use_cayley_neumann else cayley(q)
        if self.block_share:
            return blocks.expand(self.num_blocks, -1, -1)
        if self.training and self.dropout > 0:
            blocks = block_dropout(blocks, self.dropout)
        return blocks

    def constrained(self, packed: torch.Tensor) -> torch.Tensor:
        """COFT: shrink each Q_b onto the ball ‖Q_b‖_F ≤ eps / √n (‖Q_b‖_F = √2 ‖packed row‖).

        Applied in the forward pass rather than by editing the parameter in place; the scale is
        treated as a constant for the gradient, like a projection after each step.
        """
        limit = self.eps / math.sqrt(packed.shape[0])
        norms = packed.detach().norm(dim=1, keepdim=True) * math.sqrt(2)
        return packed * torch.clamp(limit / norms.clamp_min(1e-30), max=1.0)

    def transform_input(self, x, base_layer):
        blocks = self.rotation_blocks()
        rows = x.to(blocks.dtype).unflatten(-1, (self.num_blocks, self.block_size))  # (..., n, b)
        return torch.einsum("...nk,nkc->...nc", rows, blocks).flatten(-2).to(x.dtype)

    def input_matrix(self) -> torch.Tensor:
        return torch.block_diag(*self.rotation_blocks()).T

    def file_tensors(self):
        return {"oft_R.weight": self.oft_R}


def build_oft(base_layer: nn.Module, config: OftConfig, module_name: str) -> LayerAdapter:
    if isinstance(base_layer, nn.Embedding):
        raise AdapterError(f"OFT on the Embedding '{module_name}' is not supported; target Linear layers only")
    in_features, _ = weight_shape(base_layer)
    block_size = config.block_size_for(in_features, module_name)
    return OftLinear(in_features, block_size, config, is_transposed(base_layer))
