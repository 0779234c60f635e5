"""LoRA-FA (Zhang et al. 2023, "LoRA-FA: Memory-efficient Low-rank Adaptation"): A frozen, only B trains.

Paper: Zhang et al., 2023, arXiv:2308.03303; implements the update of its method section (written out
below): A frozen at its random initialisation, B trained from zero, as the paper describes.

    h = W x + s · B A x,   A fixed at its random init, B from zero

Freezing A means the layer input need not be kept for A's gradient, only the r-dimensional A x.

A method of its own rather than a ``LoraConfig`` flag: the frozen A is stored as a buffer, not a
parameter, so nothing that (re)enables an adapter's gradients (``set_trainable_adapter``, optimizer
groups from ``parameter_roles``) can train it by accident, and ``LoraConfig``'s fields keep one meaning.
The file is an ordinary PEFT ``LORA`` file (A is saved with B), so peft loads it as a plain LoRA; peft
itself offers LoRA-FA only as an optimizer over such an adapter.
"""

from __future__ import annotations

from typing import Literal

from pydantic import model_validator
from torch import nn

from tuneforge.adapters.config import LoraConfig
from tuneforge.adapters.layer import LayerAdapter
from tuneforge.adapters.lora.lora import LoraLinear, check_rank, is_transposed, weight_shape


class LoraFaConfig(LoraConfig):
    """LoRA's settings (``r``, ``alpha``, ``init``, patterns); DoRA is not part of LoRA-FA."""

    method: Literal["lora-fa"] = "lora-fa"

    @model_validator(mode="after")
    def _no_dora(self) -> "LoraFaConfig":
        if self.use_dora:
            raise ValueError("use_dora=true does not combine with lora-fa (LoRA-FA freezes A of a plain LoRA); "
                             "use method 'lora' for DoRA")
        return self


class LoraFaLinear(LoraLinear):
    """A LoRA whose A is a fixed random projection (a buffer, saved in the file)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        projection = self.lora_A.data
        del self.lora_A
        self.register_buffer("lora_A", projection)  # (r, in), never trained

    def parameter_roles(self):
        return {"lora_B": [self.lora_B]}


def build_lora_fa(base_layer: nn.Module, config: LoraFaConfig, module_name: str) -> LayerAdapter:
    r = config.rank_for(module_name)
    in_features, out_features = weight_shape(base_layer)
    check_rank(r, in_features, out_features, module_name)
    return LoraFaLinear(in_features, out_features, r, config.alpha_for(module_name), config.dropout,
                        config.use_rslora, config.init, is_transposed(base_layer))
