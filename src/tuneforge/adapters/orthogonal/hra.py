"""HRA: Householder reflection adaptation (Yuan et al. 2024).

Paper: Yuan, Liu & Xu, "Bridging The Gap between Low-rank and Orthogonal Adaptation via Householder
Reflection Adaptation", NeurIPS 2024, arXiv:2405.17484, §3.1 (the chain of r Householder reflections) and
its orthogonality regulariser.

The weight is multiplied on its input side by a chain of r Householder reflections, whose unit
normals are the columns of U (PEFT's ``hra_u``, (in, r))::

    H = H_1 H_2 ⋯ H_r,   H_i = I - 2 û_i û_iᵀ,   û_i = u_i / ‖u_i‖
    y = W H x + bias

Identity at init: U starts as r/2 random columns, each repeated twice, so H_2k-1 H_2k = I.
``apply_GS`` orthonormalises U first (modified Gram-Schmidt); the chain is then I - 2 Û Ûᵀ, a
single reflection of the span, which cannot be the identity (GS of a repeated column is 0/0), so
U starts fully random there. ``orthogonality_weight`` λ adds the paper's regulariser
λ · ‖ÛᵀÛ - I‖²_F (summed over layers) to the training loss, keeping the reflections independent.
"""

from __future__ import annotations

import math
import warnings
from typing import ClassVar, Literal

import torch
from pydantic import Field
from torch import nn

from tuneforge.adapters.config import AdapterConfig
from tuneforge.adapters.hooks import TrainingHooks
from tuneforge.adapters.layer import LayerAdapter
from tuneforge.adapters.lora.lora import is_transposed, weight_shape
from tuneforge.adapters.orthogonal.oft import MultiplicativeAdapter
from tuneforge.errors import AdapterError


class HraConfig(AdapterConfig):
    method: Literal["hra"] = "hra"
    r: int = Field(8, gt=0)
    apply_GS: bool = False
    orthogonality_weight: float = Field(0.0, ge=0.0)
    init_weights: bool = True
    fan_in_fan_out: bool = False
    bias: Literal["none"] = "none"

    peft_type: ClassVar[str] = "HRA"


class HraLinear(MultiplicativeAdapter):
    def __init__(self, in_features: int, r: int, apply_gs: bool, init_weights: bool, transposed: bool):
        super().__init__(transposed, has_input_side=True)
        self.apply_gs = apply_gs
        self.hra_u = nn.Parameter(_initial_normals(in_features, r, paired=init_weights and not apply_gs))  # (in, r)

    def unit_normals(self) -> torch.Tensor:
        """Û (in, r): normalised columns, or an orthonormal basis with ``apply_GS``."""
        if self.apply_gs:
            return gram_schmidt(self.hra_u)
        return self.hra_u / self.hra_u.norm(dim=0, keepdim=True)

    def input_matrix(self) -> torch.Tensor:
        normals = self.unit_normals()
        eye = torch.eye(normals.shape[0], dtype=normals.dtype, device=normals.device)
        if self.apply_gs:
            return eye - 2 * normals @ normals.T
        product = eye
        for u in normals.T:
            product = product - 2 * torch.outer(product @ u, u)  # product · H_i
        return product

    def transform_input(self, x, base_layer):
        normals = self.unit_normals()
        rows = x.to(normals.dtype)
        if self.apply_gs:
            return (rows - 2 * (rows @ normals) @ normals.T).to(x.dtype)
        # The row xᵀ becomes xᵀ Hᵀ = xᵀ H_r ⋯ H_1 (each H_i is symmetric): one reflection at a time,
        # O(r · in) per token instead of an (in, in) matrix.
        for u in reversed(normals.T):
            rows = rows - 2 * (rows @ u)[..., None] * u
        return rows.to(x.dtype)

    def orthogonality_penalty(self) -> torch.Tensor:
        normals = self.hra_u / self.hra_u.norm(dim=0, keepdim=True)
        gram = normals.T @ normals
        return (gram - torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)).pow(2).sum()

    def file_tensors(self):
        return {"hra_u": self.hra_u}


def _initial_normals(in_features: int, r: int, paired: bool) -> torch.Tensor:
    if paired and r % 2:
        warnings.warn(f"HRA with odd r={r} cannot pair its reflections, so it is not the identity at init; "
                      "use an even r for that", stacklevel=3)
        paired = False
    columns = torch.empty(in_features, r // 2 if paired else r)
    nn.init.kaiming_uniform_(columns, a=math.sqrt(5))
    return columns.repeat_interleave(2, dim=1) if paired else columns


def gram_schmidt(columns: torch.Tensor) -> torch.Tensor:
    """Orthonormal columns spanning the same nested subspaces (modified Gram-Schmidt)."""
    basis: list[torch.Tensor] = []
    for column in columns.T:
        for done in basis:
            column = column - (done @ column) * done
        basis.append(column / column.norm())
    return torch.stack(basis, dim=1)


class HraOrthogonality(TrainingHooks):
    """Adds λ · Σ_layers ‖ÛᵀÛ - I‖²_F to each micro-batch's loss."""

    def __init__(self, adapter_name: str, weight: float):
        self.adapter_name = adapter_name
        self.weight = weight

    def extra_loss(self, model):
        from tuneforge.adapters.model import wrapped_layers

        penalties = [layer.adapters[self.adapter_name].orthogonality_penalty()
                     for _, layer in wrapped_layers(model) if self.adapter_name in layer.adapters]
        return self.weight * torch.stack(penalties).sum() if penalties else None


def hra_hooks(model: nn.Module, adapter_name: str, config: HraConfig) -> TrainingHooks | None:
    return HraOrthogonality(adapter_name, config.orthogonality_weight) if config.orthogonality_weight > 0 else None


def build_hra(base_layer: nn.Module, config: HraConfig, module_name: str) -> LayerAdapter:
    if isinstance(base_layer, nn.Embedding):
        raise AdapterError(f"HRA on the Embedding '{module_name}' is not supported; target Linear layers only")
    in_features, _ = weight_shape(base_layer)
    if config.r > in_features:
        raise AdapterError(
            f"HRA r={config.r} for '{module_name}' exceeds in_features={in_features}: more than {in_features} "
            f"reflections of a {in_features}-dimensional space add nothing. Lower r"
        )
    return HraLinear(in_features, config.r, config.apply_GS, config.init_weights, is_transposed(base_layer))
