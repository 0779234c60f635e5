"""LoRA (Hu et al. 2021) with rsLoRA scaling (Kalajdzievski 2023).

Papers: Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", ICLR 2022, arXiv:2106.09685, §4.1,
Eq. (3) (h = W₀x + BAx, with ΔWx scaled by α/r); Kalajdzievski, "A Rank Stabilization Scaling Factor for
Fine-Tuning with LoRA", 2023, arXiv:2312.03732 (the α/√r factor). The paper initialises A from a Gaussian;
the default here is PEFT's Kaiming-uniform A (the reference code most files come from), and
``init: gaussian`` gives a Gaussian A.

    h = W x + s · B A dropout(x),   s = alpha / r  (rsLoRA: alpha / sqrt(r))

B starts at zero, so the model is unchanged at init. A is Kaiming-uniform (PEFT's default) or
Gaussian with std 1/r.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from tuneforge.adapters.config import LoraConfig
from tuneforge.adapters.layer import LayerAdapter
from tuneforge.errors import AdapterError
from tuneforge.quant.linear import QuantLinear


def lora_scaling(alpha: float, r: int, use_rslora: bool) -> float:
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def weight_shape(base_layer: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a Linear, Conv1D (weight stored transposed) or Embedding."""
    if isinstance(base_layer, nn.Embedding):
        return base_layer.num_embeddings, base_layer.embedding_dim
    if isinstance(base_layer, (nn.Linear, QuantLinear)):
        return base_layer.in_features, base_layer.out_features
    rows, cols = base_layer.weight.shape  # transformers Conv1D: (in, out)
    return rows, cols


def is_transposed(base_layer: nn.Module) -> bool:
    """GPT-2's Conv1D stores W as (in, out) — PEFT's ``fan_in_fan_out``."""
    return not isinstance(base_layer, (nn.Linear, QuantLinear, nn.Embedding))


def refuse_quantized_merge(base_layer: nn.Module) -> None:
    """A QuantLinear's ``weight`` is dequantized on demand: writing W + ΔW into it would be lost."""
    if isinstance(base_layer, QuantLinear):
        raise AdapterError(
            f"cannot merge an adapter into a quantized base layer ({base_layer.quant_type}): its weight is "
            "stored as packed codes, and merging would have to requantize W + ΔW, losing most of what the "
            "adapter learned. Keep the adapter unmerged (it trains and runs on the quantized base), or export "
            "a merged model by dequantize-merge: load the base in full precision, then merge the adapter."
        )


def check_rank(r: int, in_features: int, out_features: int, module_name: str) -> None:
    if r > min(in_features, out_features):
        raise AdapterError(
            f"rank r={r} for '{module_name}' exceeds what the layer allows: its weight is "
            f"{out_features}x{in_features}, so a rank above {min(in_features, out_features)} adds parameters "
            f"without adding expressiveness. Lower r, or set rank_pattern={{'{module_name.split('.')[-1]}': "
            f"{min(in_features, out_features)}}}."
        )


class LoraLinear(LayerAdapter):
    """LoRA on a Linear or Conv1D layer."""

    def __init__(self, in_features: int, out_features: int, r: int, alpha: float, dropout: float,
                 use_rslora: bool, init: str, transposed: bool):
        super().__init__()
        self.r = r
        self.scaling = lora_scaling(alpha, r, use_rslora)
        self.transposed = transposed
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_A = nn.Parameter(torch.empty(r, in_features))  # (r, in)
        self.lora_B = nn.Parameter(torch.zeros(out_features, r))  # (out, r)
        if init == "gaussian":
            nn.init.normal_(self.lora_A, std=1 / r)
        else:
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def lora_output(self, x: torch.Tensor) -> torch.Tensor:
        """s · B A x for x (..., in) -> (..., out), never materialising B A."""
        x = self.dropout(x).to(self.lora_A.dtype)
        return F.linear(F.linear(x, self.lora_A), self.lora_B) * self.scaling

    def transform_output(self, x, out, base_layer):
        return out + self.lora_output(x).to(out.dtype)

    def merge(self, base_layer, safe):
        refuse_quantized_merge(base_layer)
        super().merge(base_layer, safe)

    def delta_weight(self, base_layer) -> torch.Tensor:
        delta = (self.lora_B @ self.lora_A) * self.scaling  # (out, in)
        return delta.T if self.transposed else delta

    def file_tensors(self):
        return {"lora_A.weight": self.lora_A, "lora_B.weight": self.lora_B}

    def parameter_roles(self):
        return {"lora_A": [self.lora_A], "lora_B": [self.lora_B]}


class LoraEmbedding(LayerAdapter):
    """LoRA on an Embedding: the row lookup goes through A, then B maps to the embedding size.

    As in PEFT, A starts at zero and B is Gaussian (the reverse of Linear), still identity at init.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, r: int, alpha: float, use_rslora: bool):
        super().__init__()
        self.r = r
        self.scaling = lora_scaling(alpha, r, use_rslora)
        self.lora_embedding_A = nn.Parameter(torch.zeros(r, num_embeddings))  # (r, vocab)
        self.lora_embedding_B = nn.Parameter(torch.randn(embedding_dim, r))  # (dim, r)

    def transform_output(self, x, out, base_layer):
        rows = F.embedding(x, self.lora_embedding_A.T, padding_idx=base_layer.padding_idx)  # (..., r)
        return out + (rows @ self.lora_embedding_B.T * self.scaling).to(out.dtype)

    def delta_weight(self, base_layer):
        return (self.lora_embedding_B @ self.lora_embedding_A).T * self.scaling  # (vocab, dim)

    def file_tensors(self):
        return {"lora_embedding_A": self.lora_embedding_A, "lora_embedding_B": self.lora_embedding_B}

    def parameter_roles(self):
        return {"lora_A": [self.lora_embedding_A], "lora_embedding_B": [self.lora_embedding_B]}


def build_lora(base_layer: nn.Module, config: LoraConfig, module_name: str) -> LayerAdapter:
    """The registry's factory: pick the LoRA flavour for this base layer."""
    r = config.rank_for(module_name)
    alpha = config.alpha_for(module_name)
    in_features, out_features = weight_shape(base_layer)
    check_rank(r, in_features, out_features, module_name)
    if config.init not in ("kaiming", "gaussian"):
        from tuneforge.adapters.lora.inits import build_initialised_lora  # the inits build on this module

        return build_initialised_lora(base_layer, config, module_name, r, alpha)
    if isinstance(base_layer, nn.Embedding):
        if config.use_dora:
            raise AdapterError(
                f"DoRA on the Embedding '{module_name}' is not supported; exclude it "
                "(exclude_modules) or set use_dora=false"
            )
        return LoraEmbedding(in_features, out_features, r, alpha, config.use_rslora)
    if config.use_dora:
        from tuneforge.adapters.lora.dora import DoraLinear

        return DoraLinear(base_layer, in_features, out_features, r, alpha, config.dropout,
                          config.use_rslora, config.init, is_transposed(base_layer))
    return LoraLinear(in_features, out_features, r, alpha, config.dropout, config.use_rslora,
                      config.init, is_transposed(base_layer))
