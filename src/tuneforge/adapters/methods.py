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

# Each section below is owned by one family; add registrations inside your own section only.
# --- section: LoRA initialisations (PiSSA, OLoRA, CorDA, LoRA-GA, EVA, LoftQ) ---
# --- end section: LoRA initialisations ---

# --- section: rank allocation and training variants (AdaLoRA, DyLoRA, SoRA, LoRA-FA, ALLoRA, Hydra) ---
# --- end section: rank allocation ---

# --- section: parameter sharing (VeRA, VB-LoRA, MoS, LoRA-XS, LoRETTA, RoAd) ---
# --- end section: parameter sharing ---

# --- section: scaling, selective, bottleneck, sparse (IA3, BitFit, LN tuning, adapters, SHiRA, ...) ---
# --- end section: scaling, selective, bottleneck, sparse ---

# --- section: orthogonal and mixtures (OFT, BOFT, ETHER, HRA, MoLE, router) ---
# --- end section: orthogonal and mixtures ---

# --- section: model-level (prompt, prefix, P-tuning, adaption prompt, LoReFT, DiReFT) ---
# --- end section: model-level ---
