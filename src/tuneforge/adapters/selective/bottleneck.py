"""Bottleneck adapters: small down-project / non-linearity / up-project modules inserted in each block.

Papers: Houlsby et al., "Parameter-Efficient Transfer Learning for NLP", ICML 2019, arXiv:1902.00751, §2.1
(two serial adapters per layer); Pfeiffer et al., "AdapterFusion", EACL 2021, arXiv:2005.00247 (one serial
adapter after the FFN); He et al., "Towards a Unified View of Parameter-Efficient Transfer Learning", ICLR
2022, arXiv:2110.04366 (the parallel adapter with scale s). The equations are below.

    serial   (Houlsby et al. 2019; Pfeiffer et al. 2021):  h' = h + up(act(down(h)))       on a block's output h
    parallel (He et al. 2022):                             h' = h + s · up(act(down(x)))   beside the FFN, on its input x

Placements: ``houlsby`` puts serial adapters after the attention block and after the FFN;
``pfeiffer`` only after the FFN; ``parallel`` beside the FFN. The up-projection starts at zero, so a
new adapter is the identity. The bottleneck width is ``hidden / reduction_factor``.

The attention adapter wraps the attention's output projection (``self_attn.o_proj``, GPT-2's
``attn.c_proj``): its output is the attention block's output, and it is called with a positional
input, which the layer wrapper needs (Llama calls ``self_attn`` with keyword arguments only). A
whole module returning a tuple (e.g. GPT-2's ``attn`` when targeted explicitly) has its first
element adapted. The adapter is a non-linear module, so it cannot be merged into the weights.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from tuneforge.adapters.config import AdapterConfig
from tuneforge.adapters.layer import LayerAdapter
from tuneforge.adapters.lora.lora import weight_shape
from tuneforge.adapters.targeting import linear_layer_types
from tuneforge.errors import AdapterError

# Llama-style and GPT-2 block names.
ATTENTION_OUTPUT = r"(.*\.)?(self_attn\.o_proj|attn\.c_proj)"
FEED_FORWARD = r"(.*\.)?mlp"
PLACEMENT_TARGETS = {
    "houlsby": rf"{ATTENTION_OUTPUT}|{FEED_FORWARD}",
    "pfeiffer": FEED_FORWARD,
    "parallel": FEED_FORWARD,
}
ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh}


class BottleneckConfig(AdapterConfig):
    """Bottleneck adapters; ``target_modules`` defaults to the blocks ``placement`` names.

    scaling: the factor s on a parallel adapter's output (serial adapters are unscaled).
    """

    method: Literal["bottleneck"] = "bottleneck"
    target_modules: list[str] | str | None = None
    placement: Literal["houlsby", "pfeiffer", "parallel"] = "houlsby"
    reduction_factor: int = Field(16, gt=0)
    non_linearity: Literal["relu", "gelu", "silu", "tanh"] = "relu"
    scaling: float = 1.0

    @model_validator(mode="after")
    def _targets_from_placement(self):
        if self.target_modules is None:
            self.target_modules = PLACEMENT_TARGETS[self.placement]
        return self


class BottleneckAdapter(LayerAdapter):
    """down (hidden -> hidden/reduction) -> activation -> up (zero init) added to a block's output."""

    mergeable = False

    def __init__(self, in_features: int, hidden_size: int, bottleneck_size: int, non_linearity: str,
                 parallel: bool, scaling: float):
        super().__init__()
        self.parallel = parallel
        self.scaling = scaling if parallel else 1.0
        self.adapter_down = nn.Linear(in_features if parallel else hidden_size, bottleneck_size)
        self.activation = ACTIVATIONS[non_linearity]()
        self.adapter_up = nn.Linear(bottleneck_size, hidden_size)
        nn.init.zeros_(self.adapter_up.weight)
        nn.init.zeros_(self.adapter_up.bias)

    def bottleneck(self, h: torch.Tensor) -> torch.Tensor:
        h = h.to(self.adapter_down.weight.dtype)
        return self.adapter_up(self.activation(self.adapter_down(h))) * self.scaling

    def transform_output(self, x, out, base_layer):
        if isinstance(out, tuple):  # attention modules return (hidden states, attention weights, ...)
            return (self._adapt(x, out[0]), *out[1:])
        return self._adapt(x, out)

    def _adapt(self, x: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        source = x if self.parallel else hidden
        return hidden + self.bottleneck(source).to(hidden.dtype)

    def file_tensors(self):
        return dict(self.named_parameters())


def block_features(module: nn.Module, module_name: str) -> tuple[int, int]:
    """(inputs, outputs) of a block: its first linear layer's inputs and its last one's outputs."""
    linears = [m for m in module.modules() if isinstance(m, linear_layer_types())]
    if not linears:
        raise AdapterError(
            f"bottleneck: cannot tell the hidden size of '{module_name}' ({type(module).__name__}): it has no "
            "Linear/Conv1D layer. Target the attention output projection or the MLP block."
        )
    return weight_shape(linears[0])[0], weight_shape(linears[-1])[1]


def build_bottleneck(base_layer: nn.Module, config: BottleneckConfig, module_name: str) -> LayerAdapter:
    in_features, hidden = block_features(base_layer, module_name)
    width = hidden // config.reduction_factor
    if width < 1:
        raise AdapterError(
            f"bottleneck: reduction_factor={config.reduction_factor} leaves no bottleneck for '{module_name}' "
            f"(hidden size {hidden}); use a reduction_factor of at most {hidden}"
        )
    parallel = config.placement == "parallel"
    return BottleneckAdapter(in_features, hidden, width, config.non_linearity, parallel, config.scaling)
