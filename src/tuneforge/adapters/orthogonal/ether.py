"""ETHER and ETHER+: finetuning by hyperplane reflections (Bini et al. 2024).

Paper: Bini et al., "ETHER: Efficient Finetuning of Large-Scale Models with Hyperplane Reflections", ICML
2024, arXiv:2405.20271; implements the ETHER and ETHER+ transformations of its method section (written out
below).

ETHER multiplies the frozen weight on its output side by a block-diagonal Householder
reflection, one learned normal u per block (``nb`` blocks)::

    H = diag(H_1, ..., H_nb),  H_j = I - 2 û_j û_jᵀ,   W' = H W   (the bias is kept)

A reflection is orthogonal, involutive and always at distance ‖H - I‖_F = 2 from the identity,
which is what makes ETHER robust to the learning rate. It is therefore *not* the identity at
init: following the paper, u starts as a random direction (a random hyperplane).

ETHER+ relaxes the reflection to H⁺_j = I - û_j û_jᵀ + v̂_j v̂_jᵀ (no longer orthogonal) and
transforms both sides, W' = H⁺ W H̃⁺ with separate (u, v) for the input side. Starting from u = v
makes H⁺ = I, so ETHER+ is the identity at init. PEFT has no ETHER, so the file leaves are
tuneforge's own: ``ether_u`` (nb, out/nb), and for ETHER+ also ``ether_v``, ``ether_u_input``,
``ether_v_input``.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import nn

from tuneforge.adapters.config import AdapterConfig
from tuneforge.adapters.layer import LayerAdapter
from tuneforge.adapters.lora.lora import is_transposed, weight_shape
from tuneforge.adapters.orthogonal.oft import MultiplicativeAdapter, apply_without_bias, check_block_split
from tuneforge.errors import AdapterError


class EtherConfig(AdapterConfig):
    """``nb``: blocks per side (must divide the layer's dimensions); ``plus``: ETHER+."""

    method: Literal["ether"] = "ether"
    nb: int = Field(1, gt=0)
    plus: bool = False
    fan_in_fan_out: bool = False  # written for GPT-2's Conv1D layers; the layout is detected from the layer


def unit_rows(vectors: torch.Tensor) -> torch.Tensor:
    return vectors / vectors.norm(dim=-1, keepdim=True)


def reflect_rows(rows: torch.Tensor, u: torch.Tensor, v: torch.Tensor | None) -> torch.Tensor:
    """Apply the symmetric per-block map to row vectors (..., nb·d): ETHER if v is None, else ETHER+."""
    blocks = rows.unflatten(-1, u.shape)  # (..., nb, d)
    u_hat = unit_rows(u)
    along_u = (blocks * u_hat).sum(-1, keepdim=True) * u_hat
    if v is None:
        result = blocks - 2 * along_u
    else:
        v_hat = unit_rows(v)
        result = blocks - along_u + (blocks * v_hat).sum(-1, keepdim=True) * v_hat
    return result.flatten(-2)


def block_matrix(u: torch.Tensor, v: torch.Tensor | None) -> torch.Tensor:
    """The dense (nb·d, nb·d) block-diagonal matrix of ``reflect_rows`` (for merging)."""
    u_hat = unit_rows(u)
    eye = torch.eye(u.shape[-1], dtype=u.dtype, device=u.device)
    if v is None:
        blocks = eye - 2 * u_hat[:, :, None] * u_hat[:, None, :]
    else:
        v_hat = unit_rows(v)
        blocks = eye - u_hat[:, :, None] * u_hat[:, None, :] + v_hat[:, :, None] * v_hat[:, None, :]
    return torch.block_diag(*blocks)


class EtherLinear(MultiplicativeAdapter):
    def __init__(self, in_features: int, out_features: int, nb: int, plus: bool, transposed: bool):
        super().__init__(transposed, has_input_side=plus)
        self.plus = plus
        self.ether_u = nn.Parameter(torch.randn(nb, out_features // nb))  # (nb, out/nb)
        if plus:
            self.ether_v = nn.Parameter(self.ether_u.detach().clone())
            self.ether_u_input = nn.Parameter(torch.randn(nb, in_features // nb))  # (nb, in/nb)
            self.ether_v_input = nn.Parameter(self.ether_u_input.detach().clone())

    def transform_input(self, x, base_layer):
        if not self.plus:
            return x
        return reflect_rows(x.to(self.ether_u_input.dtype), self.ether_u_input, self.ether_v_input).to(x.dtype)

    def transform_output(self, x, out, base_layer):
        v = self.ether_v if self.plus else None
        return apply_without_bias(out, base_layer, lambda y: reflect_rows(y, self.ether_u, v))

    def output_matrix(self):
        return block_matrix(self.ether_u, self.ether_v if self.plus else None)

    def input_matrix(self):
        return block_matrix(self.ether_u_input, self.ether_v_input) if self.plus else None

    def unmerge(self, base_layer):
        if self.plus:
            # H⁺ is singular when û ⟂ v̂ (eigenvalues 1 ± √(1 - (ûᵀv̂)²)); then W cannot be recovered.
            for u, v in ((self.ether_u, self.ether_v), (self.ether_u_input, self.ether_v_input)):
                cosines = (unit_rows(u) * unit_rows(v)).sum(-1).abs()
                if cosines.min() < 1e-3:
                    raise AdapterError(
                        "cannot unmerge this ETHER+ adapter: one of its blocks has u orthogonal to v, so its "
                        "transform is singular and the original weights cannot be recovered. Reload the base model"
                    )
        super().unmerge(base_layer)

    def file_tensors(self):
        if not self.plus:
            return {"ether_u": self.ether_u}
        return {"ether_u": self.ether_u, "ether_v": self.ether_v,
                "ether_u_input": self.ether_u_input, "ether_v_input": self.ether_v_input}


def build_ether(base_layer: nn.Module, config: EtherConfig, module_name: str) -> LayerAdapter:
    if isinstance(base_layer, nn.Embedding):
        raise AdapterError(f"ETHER on the Embedding '{module_name}' is not supported; target Linear layers only")
    in_features, out_features = weight_shape(base_layer)
    check_block_split(out_features, config.nb, module_name, "nb", side="out_features")
    if config.plus:
        check_block_split(in_features, config.nb, module_name, "nb", side="in_features")
    return EtherLinear(in_features, out_features, config.nb, config.plus, is_transposed(base_layer))
