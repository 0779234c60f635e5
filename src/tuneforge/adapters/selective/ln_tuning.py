"""LN tuning (Zhao et al. 2023): train only the normalisation layers, as per-adapter copies.

Paper: Zhao et al., "Tuning LayerNorm in Attention: Towards Efficient Multi-Modal LLM Finetuning", 2023,
arXiv:2312.11420; implements the method section's recipe, training only the normalisation layers' weights
and biases (each norm's forward, y = γ ⊙ norm(x) + β, with γ and β trainable).

Each targeted norm (LayerNorm, RMSNorm, transformers' ``LlamaRMSNorm``, ...) gets a trainable copy;
while the adapter is live the copy replaces the norm. Merging writes the copy's weights into the
base norm and keeps the originals so unmerge restores them exactly. The file holds the copy's
tensors under PEFT's names (``<norm>.ln_tuning_layers.weight`` / ``.bias``).
"""

from __future__ import annotations

import copy
from typing import ClassVar, Literal

import torch
from torch import nn

from tuneforge.adapters.config import AdapterConfig, TargetSpec
from tuneforge.adapters.layer import LayerAdapter
from tuneforge.adapters.targeting import ALL_NORMS, is_norm_layer
from tuneforge.errors import AdapterError


class LNTuningConfig(AdapterConfig):
    """Norm layers to train: ``"all-norms"`` (every module whose class name ends in ``Norm``) or names.

    peft reads ``target_modules`` as names or a regex only, so give a list (e.g. ``["input_layernorm",
    "post_attention_layernorm", "norm"]``) when the file must load in peft.
    """

    method: Literal["ln-tuning"] = "ln-tuning"
    target_modules: TargetSpec = ALL_NORMS

    peft_type: ClassVar[str] = "LN_TUNING"


class NormLayerKind(type):
    """Lets ``isinstance(m, NormLayer)`` mean "a norm layer by class name" for the registry's type check."""

    def __instancecheck__(cls, instance) -> bool:
        return isinstance(instance, nn.Module) and is_norm_layer(instance)


class NormLayer(metaclass=NormLayerKind):
    """Any LayerNorm/RMSNorm-like module (class name ending in ``Norm``)."""


class LNTuningLayer(LayerAdapter):
    """A trainable copy of one norm layer that runs in place of the original."""

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        self.ln_tuning_layers = copy.deepcopy(base_layer)
        self._originals: dict[str, torch.Tensor] | None = None

    def transform_output(self, x, out, base_layer):
        # The norm is recomputed on x (cheap next to the matmuls around it) rather than rescaling out,
        # which would need each norm kind's formula.
        return self.ln_tuning_layers(x).to(out.dtype)

    def _pairs(self, base_layer: nn.Module):
        base = dict(base_layer.named_parameters())
        return [(base[name], tuned) for name, tuned in self.ln_tuning_layers.named_parameters()]

    def delta_weight(self, base_layer) -> torch.Tensor:
        return self.ln_tuning_layers.weight - base_layer.weight

    def merge(self, base_layer, safe):
        tuned = [t for _, t in self._pairs(base_layer)]
        if safe and not all(torch.isfinite(t).all() for t in tuned):
            raise AdapterError("safe merge refused: the LN tuning copy holds NaN/Inf; the base model is unchanged")
        with torch.no_grad():
            self._originals = {}
            for index, (base, tuned) in enumerate(self._pairs(base_layer)):
                self._originals[str(index)] = base.detach().clone()
                base.copy_(tuned)

    def unmerge(self, base_layer):
        with torch.no_grad():
            for index, (base, _) in enumerate(self._pairs(base_layer)):
                base.copy_(self._originals[str(index)])
        self._originals = None

    def file_tensors(self):
        return {f"ln_tuning_layers.{name}": param for name, param in self.ln_tuning_layers.named_parameters()}


def build_ln_tuning(base_layer: nn.Module, config: LNTuningConfig, module_name: str) -> LayerAdapter:
    if not is_norm_layer(base_layer):
        raise AdapterError(
            f"ln-tuning: '{module_name}' is a {type(base_layer).__name__}, not a norm layer; target "
            f"norm layers only (target_modules='{ALL_NORMS}' picks every class whose name ends in 'Norm')"
        )
    return LNTuningLayer(base_layer)
