"""RoAd (Liao et al. 2024, "3-in-1"): rotate and scale pairs of output elements.

Paper: Liao et al., "3-in-1: 2D Rotary Adaptation for Efficient Finetuning, Efficient Batching and
Composability", 2024, arXiv:2409.00119; implements the paired rotation of its method section (written out
below) in PEFT's three variants and layout, which is what files are exchanged in.

The layer's output h = W x + b is cut into groups of ``group_size``; inside a group, element i of the
first half pairs with element i of the second half, and each pair (h_i, h_j) becomes

    y_i = c_i · h_i − s_i · h_j,     y_j = c_j · h_j + s_j · h_i

with c = α cos θ and s = α sin θ (for road_4: c = α₁ cos θ₁, s = α₂ sin θ₂). PEFT's variants, whose
parameter layout the files follow (``road_theta``, ``road_alpha``):
- road_1: one (α, θ) per pair, shared by both elements: out/2 of each;
- road_2: one (α, θ) per element: out of each;
- road_4: per element, separate (α₁, θ₁) for c and (α₂, θ₂) for s: 2·out of each, stored per group
  as [first group_size for c | next group_size for s].
At init α = 1, θ = 0, so y = h. The map is a block-diagonal matrix R (2×2 blocks, a scaled rotation
for road_1), so it merges as W' = R W, b' = R b and unmerges with the blocks' exact 2×2 inverses.
Being element-wise, per-row serving costs two multiplies per element.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from pydantic import Field, field_validator
from torch import nn

from tuneforge.adapters.layer import LayerAdapter
from tuneforge.adapters.lora.lora import is_transposed, refuse_quantized_merge, weight_shape
from tuneforge.adapters.sharing.vera import PeftFlags
from tuneforge.errors import AdapterError

PARAMETERS_PER_OUTPUT = {"road_1": 0.5, "road_2": 1, "road_4": 2}


class RoadConfig(PeftFlags):
    """RoAd: ``variant`` road_1 / road_2 / road_4; ``group_size`` (even) must divide each layer's out_features.

    init_weights=false draws θ ~ N(0, 0.5²), α ~ N(1, 0.5²) (PEFT's meaning): a non-identity start for tests.
    """

    method: Literal["road"] = "road"
    variant: Literal["road_1", "road_2", "road_4"] = "road_1"
    group_size: int = Field(64, gt=0)
    init_weights: bool = True

    peft_type: ClassVar[str] = "ROAD"

    @field_validator("group_size")
    @classmethod
    def _even(cls, value: int) -> int:
        if value % 2:
            raise ValueError(f"group_size={value} must be even: elements are rotated in pairs")
        return value


def rotation_columns(variant: str, group_size: int, theta: torch.Tensor, alpha: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """(c, s), each (out,): the diagonal and the pair-coupling coefficients of R."""
    half = group_size // 2
    if variant == "road_1":
        # one value per pair: repeat each group's half for its second half
        theta = theta.reshape(-1, 1, half).expand(-1, 2, half).reshape(-1)
        alpha = alpha.reshape(-1, 1, half).expand(-1, 2, half).reshape(-1)
    if variant in ("road_1", "road_2"):
        return alpha * theta.cos(), alpha * theta.sin()
    theta, alpha = theta.reshape(-1, 2, group_size), alpha.reshape(-1, 2, group_size)
    return (alpha[:, 0] * theta[:, 0].cos()).reshape(-1), (alpha[:, 1] * theta[:, 1].sin()).reshape(-1)


def swap_halves(h: torch.Tensor, group_size: int) -> torch.Tensor:
    """Each element's partner along the last dim: (h_j, h_i) in place of (h_i, h_j) within each group."""
    grouped = h.reshape(*h.shape[:-1], -1, 2, group_size // 2)
    return grouped.flip(-2).reshape(h.shape)


def apply_rotation(h: torch.Tensor, c: torch.Tensor, s: torch.Tensor, group_size: int) -> torch.Tensor:
    """y = R h along the last dim: y_i = c_i h_i − s_i h_j (first half), y_j = c_j h_j + s_j h_i."""
    half = group_size // 2
    sign = torch.cat([-torch.ones(half), torch.ones(half)]).to(s).repeat(s.shape[0] // group_size)
    return c * h + sign * s * swap_halves(h, group_size)


def inverse_columns(c: torch.Tensor, s: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(c', s') of R⁻¹ in the same form: each block [[c_i, −s_i], [s_j, c_j]] inverts to
    [[c_j, s_i], [−s_j, c_i]] / (c_i c_j + s_i s_j)."""
    det = c * swap_halves(c, group_size) + s * swap_halves(s, group_size)
    return swap_halves(c, group_size) / det, -s / det


class RoadLinear(LayerAdapter):
    """RoAd on a Linear or Conv1D layer's output."""

    def __init__(self, out_features: int, variant: str, group_size: int, init_weights: bool, transposed: bool):
        super().__init__()
        self.variant, self.group_size, self.transposed = variant, group_size, transposed
        size = int(out_features * PARAMETERS_PER_OUTPUT[variant])
        if init_weights:
            self.road_theta = nn.Parameter(torch.zeros(size))
            self.road_alpha = nn.Parameter(torch.ones(size))
        else:
            self.road_theta = nn.Parameter(torch.randn(size) * 0.5)
            self.road_alpha = nn.Parameter(1 + torch.randn(size) * 0.5)

    def columns(self) -> tuple[torch.Tensor, torch.Tensor]:
        return rotation_columns(self.variant, self.group_size, self.road_theta, self.road_alpha)

    def rotation_matrix(self) -> torch.Tensor:
        """R (out, out), for inspection and tests; the adapter itself never builds it."""
        c, s = self.columns()
        return apply_rotation(torch.eye(c.shape[0], dtype=c.dtype), c, s, self.group_size).T

    def transform_output(self, x, out, base_layer):
        c, s = self.columns()
        return apply_rotation(out.to(c.dtype), c, s, self.group_size).to(out.dtype)

    def _rotated(self, base_layer, c: torch.Tensor, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """R W (rows of an (out, in) weight; columns of Conv1D's (in, out)) and R b, in their own dtypes."""
        weight, bias = base_layer.weight.data, base_layer.bias
        rows = weight.to(c.dtype) if self.transposed else weight.T.to(c.dtype)  # (in, out)
        rotated = apply_rotation(rows, c, s, self.group_size)
        rotated = (rotated if self.transposed else rotated.T).to(weight.dtype)
        if bias is None:
            return rotated, None
        return rotated, apply_rotation(bias.data.to(c.dtype), c, s, self.group_size).to(bias.dtype)

    def _write(self, base_layer, c: torch.Tensor, s: torch.Tensor, safe: bool) -> None:
        with torch.no_grad():
            weight, bias = self._rotated(base_layer, c.detach(), s.detach())
            if safe and not all(torch.isfinite(t).all() for t in (weight, bias) if t is not None):
                raise AdapterError("safe merge refused: merging RoadLinear would put NaN/Inf into the base weights; "
                                   "the base model is unchanged. Check the adapter for diverged values.")
            base_layer.weight.data.copy_(weight)
            if bias is not None:
                base_layer.bias.data.copy_(bias)

    def merge(self, base_layer, safe):
        """W' = R W and b' = R b: the bias is part of the rotated output."""
        refuse_quantized_merge(base_layer)
        self._write(base_layer, *self.columns(), safe)

    def unmerge(self, base_layer):
        self._write(base_layer, *inverse_columns(*self.columns(), self.group_size), safe=False)

    def delta_weight(self, base_layer) -> torch.Tensor:
        """(R − I) W: RoAd multiplies W, so its delta depends on W (and the bias changes too, see merge)."""
        c, s = self.columns()
        weight = base_layer.weight
        rows = weight.to(c.dtype) if self.transposed else weight.T.to(c.dtype)  # (in, out)
        delta = apply_rotation(rows, c, s, self.group_size) - rows
        return delta if self.transposed else delta.T

    def file_tensors(self):
        return {"road_theta": self.road_theta, "road_alpha": self.road_alpha}


def build_road(base_layer: nn.Module, config: RoadConfig, module_name: str) -> RoadLinear:
    _, out_features = weight_shape(base_layer)
    if out_features % config.group_size:
        fitting = [g for g in range(2, min(out_features, config.group_size) + 1, 2) if out_features % g == 0]
        fix = (f"Use a group_size dividing {out_features} (e.g. {fitting[-1]})." if fitting else
               "Its out_features is odd, so its outputs cannot be paired: leave it out (exclude_modules).")
        raise AdapterError(
            f"RoAd group_size={config.group_size} does not divide out_features={out_features} of '{module_name}': "
            f"outputs are rotated in pairs within groups. {fix}"
        )
    return RoadLinear(out_features, config.variant, config.group_size, config.init_weights, is_transposed(base_layer))
