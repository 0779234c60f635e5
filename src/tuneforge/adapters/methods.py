"""Registry entries of the built-in methods: one ``register_method`` call per method family."""

from __future__ import annotations

from torch import nn

from tuneforge.adapters.config import LoraConfig
from tuneforge.adapters.lora import build_lora
from tuneforge.adapters.registry import MethodSpec, register_method
from tuneforge.adapters.targeting import linear_layer_types

register_method(MethodSpec(
    name="lora",
    config_class=LoraConfig,
    supported_layers=lambda: linear_layer_types() + (nn.Embedding,),
    build=build_lora,
    description="LoRA, rsLoRA (use_rslora) and DoRA (use_dora) on Linear, Conv1D and Embedding layers",
))
