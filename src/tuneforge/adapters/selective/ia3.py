"""(IA)³ (Liu et al. 2022): learned vectors that rescale activations, initialised to ones.

Paper: Liu et al., "Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than In-Context Learning"
(T-Few), NeurIPS 2022, arXiv:2205.05638, §3.3: l_k ⊙ K, l_v ⊙ V and l_ff ⊙ γ(W₁x), the last being the FFN's
down-projection input, as implemented here and in PEFT.

Keys and values are rescaled on the output side, ``out · l``; the FFN's down-projection is
rescaled on its input side, ``W (x · l)`` (``feedforward_modules``). Both fold into W:

    output side:  W' = diag(l) W,  b' = l · b      input side:  W' = W diag(l),  b' unchanged

The vectors are stored as PEFT does (``ia3_l``: (out, 1) on the output side, (1, in) on the input
side) whatever the layer's weight layout, so files load in peft unchanged.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import torch
from pydantic import model_validator
from torch import nn

from tuneforge.adapters.config import AdapterConfig, TargetSpec
from tuneforge.adapters.layer import LayerAdapter, _write_weight
from tuneforge.adapters.lora.lora import is_transposed, refuse_quantized_merge, weight_shape
from tuneforge.adapters.targeting import name_matches
from tuneforge.errors import AdapterError

LLAMA_TARGETS = ["k_proj", "v_proj", "down_proj"]
LLAMA_FEEDFORWARD = ["down_proj"]


class IA3Config(AdapterConfig):
    """(IA)³: one scaling vector per target layer; ``feedforward_modules`` scale the input side.

    The defaults are the paper's choice for Llama-style blocks (keys, values, FFN down-projection).
    """

    method: Literal["ia3"] = "ia3"
    target_modules: TargetSpec = LLAMA_TARGETS
    feedforward_modules: TargetSpec = LLAMA_FEEDFORWARD
    init: Literal["ones", "random"] = "ones"
    fan_in_fan_out: bool = False  # read from the layer type; kept so PEFT files round-trip silently

    peft_type: ClassVar[str] = "IA3"
    peft_field_names: ClassVar[dict[str, str]] = {"init": "init_ia3_weights"}

    @model_validator(mode="after")
    def _feedforward_within_targets(self):
        ff, targets = self.feedforward_modules, self.target_modules
        if isinstance(ff, list) and isinstance(targets, list):
            stray = [m for m in ff if not any(m == t or m.endswith("." + t) for t in targets)]
            if stray:
                raise ValueError(
                    f"feedforward_modules {stray} are not in target_modules {targets}; every feedforward "
                    "module must also be a target (add it to target_modules)"
                )
        return self

    def to_peft_dict(self) -> dict[str, Any]:
        data = super().to_peft_dict()
        data["init_ia3_weights"] = self.init == "ones"
        return data

    @classmethod
    def normalize_peft_values(cls, data: dict[str, Any]) -> dict[str, Any]:
        if isinstance(data.get("init"), bool):
            data["init"] = "ones" if data["init"] else "random"
        return data


class IA3Layer(LayerAdapter):
    """One scaling vector on the output (keys/values) or the input (FFN) side of a linear layer."""

    def __init__(self, in_features: int, out_features: int, feedforward: bool, transposed: bool, init: str):
        super().__init__()
        self.feedforward = feedforward
        self.transposed = transposed
        self.modifies_input = feedforward
        shape = (1, in_features) if feedforward else (out_features, 1)
        self.ia3_l = nn.Parameter(torch.ones(shape) if init == "ones" else torch.randn(shape))

    def scale(self) -> torch.Tensor:
        return self.ia3_l.flatten()  # (in,) or (out,)

    def transform_input(self, x, base_layer):
        return (x * self.scale().to(x.dtype)) if self.feedforward else x

    def transform_output(self, x, out, base_layer):
        return out if self.feedforward else out * self.scale().to(out.dtype)

    def _weight_factor(self) -> torch.Tensor:
        """The scale shaped to broadcast over the stored weight: rows for outputs, columns for inputs."""
        scale = self.scale()
        scales_rows = self.feedforward == self.transposed  # which axis of the stored W the vector runs along
        return scale.unsqueeze(1) if scales_rows else scale.unsqueeze(0)

    def delta_weight(self, base_layer) -> torch.Tensor:
        weight = base_layer.weight
        return weight * (self._weight_factor().to(weight.dtype) - 1)

    def merge(self, base_layer, safe):
        refuse_quantized_merge(base_layer)
        weight, bias = base_layer.weight, base_layer.bias
        with torch.no_grad():
            merged = weight.data * self._weight_factor().to(weight.dtype)
            _write_weight(weight, merged, safe, self)  # checks for NaN/Inf before writing when safe
            if bias is not None and not self.feedforward:
                # (W x + b) · l: the bias is scaled with the output; an input-side scale leaves it alone.
                bias.data *= self.scale().to(bias.dtype)

    def unmerge(self, base_layer):
        scale = self.scale()
        if (scale == 0).any():
            raise AdapterError(
                "cannot unmerge an IA3 adapter with a zero scaling entry: the merged weights lost that "
                "row/column. Reload the base model instead."
            )
        with torch.no_grad():
            base_layer.weight.data /= self._weight_factor().to(base_layer.weight.dtype)
            if base_layer.bias is not None and not self.feedforward:
                base_layer.bias.data /= scale.to(base_layer.bias.dtype)

    def file_tensors(self):
        return {"ia3_l": self.ia3_l}


def build_ia3(base_layer: nn.Module, config: IA3Config, module_name: str) -> LayerAdapter:
    in_features, out_features = weight_shape(base_layer)
    if isinstance(base_layer, nn.Embedding):
        raise AdapterError(f"ia3: '{module_name}' is an Embedding; IA3 scales Linear/Conv1D layers only")
    feedforward = name_matches(config.feedforward_modules, module_name)
    return IA3Layer(in_features, out_features, feedforward, is_transposed(base_layer), config.init)
