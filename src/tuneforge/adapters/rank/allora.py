"""ALLoRA (Huang & Balestriero 2024, "ALLoRA: Adaptive Learning Rate Mitigates LoRA Fatal Flaws",
arXiv:2410.09692, Section 4).

A LoRA without dropout and without the alpha/r scaling factor (h = W x + B A x), trained with an
adaptive learning rate per row of ΔW = B A (one row per output feature i)::

    c_i = 1 / sqrt(‖(B A)_{i,:}‖₂ + 1/η²)        i = 1 … d_out

The paper multiplies the gradient flowing into row i of the update by c_i, and leaves the gradient
propagated to the layer's input untouched. Rows near zero (all of them at init, since B = 0) get a
multiplier of up to η, so B escapes zero quickly; large rows take smaller steps, which replaces the
scaling factor's damping per row rather than per layer. We follow the paper's coefficient (unsquared
row norm, as the paper writes it) and apply it in the two places it acts:

- **B** (row i of B *is* output feature i): the coefficient is a per-row learning rate. A scale on
  B's gradient would be cancelled by Adam, which divides each coordinate by its own gradient history,
  so it is applied to the optimizer's *step* instead (``StepScaledAdapter``, adapters/optim.py); with
  SGD the two are the same rule.
- **A**: A's gradient mixes all output rows (∂L/∂A = Bᵀ diag(c) G X over the tokens), so the
  coefficients reweight the rows' contributions inside A's gradient, as in the paper
  (``_RowScaledLoraBranch``); the input gradient is the plain G B A.

The file is an ordinary PEFT ``LORA`` file with lora_alpha = r (scaling 1).
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from tuneforge.adapters.config import AdapterConfig
from tuneforge.adapters.layer import LayerAdapter
from tuneforge.adapters.lora.lora import LoraLinear, check_rank, is_transposed, weight_shape
from tuneforge.adapters.optim import StepScaledAdapter


class AlloraConfig(AdapterConfig):
    method: Literal["allora"] = "allora"
    r: int = Field(8, gt=0)
    eta: float = Field(4.0, gt=0.0, description="largest learning-rate multiplier, reached by all-zero rows of ΔW")
    fan_in_fan_out: bool = False  # PEFT's flag for GPT-2's Conv1D; the layout is detected from the layer

    peft_type: ClassVar[str] = "LORA"

    def to_peft_dict(self) -> dict[str, Any]:
        data = super().to_peft_dict()
        # No scaling factor: PEFT's scaling is lora_alpha / r, so alpha = r gives 1.
        data.update(lora_alpha=self.r, lora_dropout=0.0, init_lora_weights=True)
        return data

    @classmethod
    def from_peft_dict(cls, data: dict[str, Any], source: str = "adapter_config.json") -> "AdapterConfig":
        data = {k: v for k, v in data.items() if k not in ("lora_alpha", "lora_dropout", "init_lora_weights")}
        return super().from_peft_dict(data, source)


def row_coefficients(lora_A: torch.Tensor, lora_B: torch.Tensor, eta: float) -> torch.Tensor:
    """c_i = 1 / sqrt(‖(B A)_{i,:}‖ + 1/η²) for each output row i, as a (d_out,) float32 vector.

    ‖B_i A‖² = B_i (A Aᵀ) B_iᵀ, so only the (r, r) Gram matrix is formed, never B A itself.
    """
    lora_A, lora_B = lora_A.detach().float(), lora_B.detach().float()
    gram = lora_A @ lora_A.T  # (r, r)
    row_norms = ((lora_B @ gram) * lora_B).sum(dim=1).clamp_min(0.0).sqrt()  # (out,)
    return (row_norms + 1.0 / eta ** 2).rsqrt()


class _RowScaledLoraBranch(torch.autograd.Function):
    """y = (x Aᵀ) Bᵀ whose A-gradient sees the output gradient scaled per row by c (B and x do not)."""

    @staticmethod
    def forward(ctx, x, lora_A, lora_B, eta):
        ctx.save_for_backward(x, lora_A, lora_B)
        ctx.eta = eta
        return F.linear(F.linear(x, lora_A), lora_B)  # (..., out)

    @staticmethod
    def backward(ctx, grad_out):
        x, lora_A, lora_B = ctx.saved_tensors
        dtype = lora_A.dtype
        grad = grad_out.reshape(-1, grad_out.shape[-1]).to(dtype)  # (N, out)
        inputs = x.reshape(-1, x.shape[-1]).to(dtype)  # (N, in)
        grad_x = grad_A = grad_B = None
        if ctx.needs_input_grad[0]:
            grad_x = (grad @ lora_B @ lora_A).reshape(x.shape).to(x.dtype)
        if ctx.needs_input_grad[1]:
            scaled = grad * row_coefficients(lora_A, lora_B, ctx.eta).to(dtype)  # (N, out)
            grad_A = (scaled @ lora_B).T @ inputs  # (r, in)
        if ctx.needs_input_grad[2]:
            grad_B = grad.T @ (inputs @ lora_A.T)  # (out, r)
        return grad_x, grad_A, grad_B, None


class AlloraLinear(LoraLinear, StepScaledAdapter):
    """LoRA with scaling 1 and no dropout, trained with ALLoRA's per-row adaptive learning rate."""

    def __init__(self, in_features: int, out_features: int, r: int, eta: float, transposed: bool):
        super().__init__(in_features, out_features, r, alpha=r, dropout=0.0, use_rslora=False,
                         init="kaiming", transposed=transposed)
        self.eta = eta

    def lora_output(self, x: torch.Tensor) -> torch.Tensor:
        return _RowScaledLoraBranch.apply(x.to(self.lora_A.dtype), self.lora_A, self.lora_B, self.eta)

    def step_multipliers(self):
        coefficients = row_coefficients(self.lora_A, self.lora_B, self.eta)
        return [(self.lora_B, coefficients[:, None])]  # row i of B is output row i of ΔW


def build_allora(base_layer: nn.Module, config: AlloraConfig, module_name: str) -> LayerAdapter:
    in_features, out_features = weight_shape(base_layer)
    check_rank(config.r, in_features, out_features, module_name)
    return AlloraLinear(in_features, out_features, config.r, config.eta, transposed=is_transposed(base_layer))
