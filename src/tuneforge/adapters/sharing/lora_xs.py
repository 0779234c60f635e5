"""LoRA-XS (Bałazy et al. 2024): a trainable r×r core between frozen singular vectors of W.

Paper: Bałazy et al., "LoRA-XS: Low-Rank Adaptation with Extremely Small Number of Parameters", 2024,
arXiv:2405.17604; implements the update of its method section (written out below): frozen factors from the
truncated SVD of W, a trainable r×r matrix between them.

    h = W x + s · B R A x,   B = U_r S_r (out, r),  A = V_rᵀ (r, in),  s = alpha / r

from the truncated SVD W ≈ U_r S_r V_rᵀ. R starts at zero, so the model is unchanged at init; only
R trains (r² numbers per layer, independent of the layer's size).

What the file stores: R (``lora_xs_R``) plus a fingerprint of the frozen factors, not A and B (that
would cost r(in + out) per layer, LoRA's size). A and B are rebuilt from the base weights on load;
singular vectors are only defined up to sign, so each pair (u_k, v_k) is flipped to make u_k's
largest-magnitude entry positive, and the fingerprint (column sums of B, row sums of A, shape (2, r))
is compared on load: an adapter loaded onto other base weights, or onto weights whose near-equal
singular values come out in another order (e.g. after a cast to bf16), is refused rather than silently
wrong. ``save_factors=true`` stores A and B too (``lora_xs_A``, ``lora_xs_B``) and loads them as they
are, for adapters that must move between dtypes or LAPACK builds. PEFT has no LoRA-XS, so the format
is tuneforge's own.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from tuneforge.adapters.layer import LayerAdapter
from tuneforge.adapters.lora.lora import is_transposed, refuse_quantized_merge, weight_shape
from tuneforge.adapters.sharing.vera import PeftFlags, check_rank_fits
from tuneforge.errors import AdapterError

# Relative to each fingerprint row's largest entry: a bf16 cast of the same weights moves it ~1e-2 at
# most when the spectrum has gaps; other weights or reordered singular vectors move it by O(1).
FINGERPRINT_RTOL = 2e-2


class LoraXsConfig(PeftFlags):
    """LoRA-XS: ``r`` singular directions per layer, r² trainable numbers each; ΔW = (alpha/r)·B R A.

    save_factors=true also stores the frozen A and B (r(in + out) per layer) instead of re-deriving them.
    """

    method: Literal["lora-xs"] = "lora-xs"
    r: int = Field(16, gt=0)
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    save_factors: bool = False

    peft_type: ClassVar[str | None] = None


def principal_factors(weight: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """B = U_r S_r (out, r) and A = V_rᵀ (r, in) of ``weight`` (out, in), signs made canonical."""
    u, s, vh = torch.linalg.svd(weight.float(), full_matrices=False)
    u, s, vh = u[:, :r], s[:r], vh[:r]
    peaks = u.abs().argmax(dim=0)  # (r,)
    signs = torch.sign(u[peaks, torch.arange(r)])
    signs[signs == 0] = 1
    return u * (signs * s), vh * signs.unsqueeze(1)


def fingerprint(lora_b: torch.Tensor, lora_a: torch.Tensor) -> torch.Tensor:
    return torch.stack([lora_b.sum(dim=0), lora_a.sum(dim=1)])  # (2, r)


class LoraXsLinear(LayerAdapter):
    """LoRA-XS on a Linear or Conv1D layer; A and B are non-persistent buffers derived from W."""

    def __init__(self, base_layer: nn.Module, r: int, alpha: float, dropout: float, transposed: bool,
                 save_factors: bool):
        super().__init__()
        self.r = r
        self.scaling = alpha / r
        self.save_factors = save_factors
        self.transposed = transposed
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        with torch.no_grad():
            weight = base_layer.weight
            lora_b, lora_a = principal_factors(weight.T if transposed else weight, r)
        self.register_buffer("lora_A", lora_a, persistent=False)  # (r, in)
        self.register_buffer("lora_B", lora_b, persistent=False)  # (out, r)
        self.lora_xs_R = nn.Parameter(torch.zeros(r, r))

    def transform_output(self, x, out, base_layer):
        x = self.dropout(x).to(self.lora_xs_R.dtype)
        delta = F.linear(F.linear(F.linear(x, self.lora_A), self.lora_xs_R), self.lora_B) * self.scaling
        return out + delta.to(out.dtype)

    def delta_weight(self, base_layer) -> torch.Tensor:
        delta = self.lora_B @ self.lora_xs_R @ self.lora_A * self.scaling  # (out, in)
        return delta.T if self.transposed else delta

    def merge(self, base_layer, safe):
        refuse_quantized_merge(base_layer)
        super().merge(base_layer, safe)

    def file_tensors(self):
        tensors = {"lora_xs_R": self.lora_xs_R,
                   "lora_xs_fingerprint": fingerprint(self.lora_B, self.lora_A).to(self.lora_xs_R.dtype)}
        if self.save_factors:
            tensors.update(lora_xs_A=self.lora_A, lora_xs_B=self.lora_B)
        return tensors

    def load_file_tensors(self, tensors: dict[str, torch.Tensor], where: str) -> None:
        if not self.save_factors:
            self._check_fingerprint(tensors, where)
        super().load_file_tensors(tensors, where)  # R (and A, B when saved); the fingerprint is recomputed

    def _check_fingerprint(self, tensors: dict[str, torch.Tensor], where: str) -> None:
        stored = tensors.get("lora_xs_fingerprint")
        if stored is None:
            raise AdapterError(f"adapter file has no tensor '{where}.lora_xs_fingerprint' (shape (2, {self.r}))")
        current = fingerprint(self.lora_B, self.lora_A)
        scale = current.abs().amax(dim=1, keepdim=True)  # (2, 1): compare relative to each row's size
        matches = stored.shape == current.shape and bool(
            ((stored.to(current) - current).abs() <= FINGERPRINT_RTOL * scale).all())
        if not matches:
            raise AdapterError(
                f"'{where}': the LoRA-XS adapter was trained on different base weights: the singular vectors "
                "of this layer do not match the fingerprint saved with it. Load it onto the exact base model "
                "(and dtype) it was trained on, or save the adapter with save_factors=true."
            )


def build_lora_xs(base_layer: nn.Module, config: LoraXsConfig, module_name: str) -> LoraXsLinear:
    in_features, out_features = weight_shape(base_layer)
    check_rank_fits(config.r, in_features, out_features, module_name)
    return LoraXsLinear(base_layer, config.r, config.alpha, config.dropout, is_transposed(base_layer),
                        config.save_factors)
