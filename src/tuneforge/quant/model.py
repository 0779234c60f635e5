"""Quantize a whole model in place: every ``nn.Linear`` not skipped becomes a ``QuantLinear``."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from tuneforge.quant.allocator import release_free_memory, return_large_buffers_to_os
from tuneforge.quant.linear import QuantLinear, check_quant_settings


def quantize_model(model: nn.Module, bits: int = 4, quant_type: str = "nf4", double_quant: bool = True,
                   blocksize: int = 64, compute_dtype: torch.dtype = torch.bfloat16,
                   skip_modules: Sequence[str] | None = ("lm_head",), chunk_rows: int | None = None) -> nn.Module:
    """Replace each ``nn.Linear`` by a ``QuantLinear``, one layer at a time; returns ``model``.

    Peak memory stays near the model's size plus one layer in float32: each Linear is quantized and
    swapped before the next one is touched, and the original weight is released once replaced (unless
    something else, such as a tied embedding, still holds it). ``skip_modules`` entries match whole
    dotted name parts: ``'lm_head'`` skips ``lm_head``; ``'mlp'`` skips every ``...mlp.*`` Linear.
    ``quant_type``, ``blocksize`` and ``double_quant`` apply to ``bits=4``; ``bits=8`` is int8 per row.
    """
    check_quant_settings(bits, quant_type, blocksize, compute_dtype)
    return_large_buffers_to_os()
    skip = list(skip_modules or [])
    targets = [name for name, module in model.named_modules()
               if isinstance(module, nn.Linear) and not is_skipped(name, skip)]
    for name in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        linear = getattr(parent, child)
        quantized = QuantLinear.from_linear(linear, bits=bits, quant_type=quant_type, blocksize=blocksize,
                                            double_quant=double_quant, compute_dtype=compute_dtype,
                                            chunk_rows=chunk_rows)
        setattr(parent, child, quantized.train(linear.training))
        del linear, quantized
    release_free_memory()  # the replaced full-precision weights must not stay resident
    return model


def is_skipped(name: str, skip_modules: Sequence[str]) -> bool:
    parts = name.split(".")
    for entry in skip_modules:
        wanted = entry.split(".")
        if any(parts[i:i + len(wanted)] == wanted for i in range(len(parts) - len(wanted) + 1)):
            return True
    return False


def quantized_layers(model: nn.Module) -> list[tuple[str, QuantLinear]]:
    return [(name, module) for name, module in model.named_modules() if isinstance(module, QuantLinear)]


def quantization_of(model: nn.Module) -> dict | None:
    """How the model's base is quantized, in the training config's ``quantization:`` keys (read off its
    first ``QuantLinear``); None when no layer is quantized. ``skip_modules`` cannot be read back, so
    it is left out (its default, ``["lm_head"]``, applies)."""
    layers = quantized_layers(model)
    if not layers:
        return None
    layer = layers[0][1]
    settings = {"bits": layer.bits, "type": layer.quant_type,
                "compute_dtype": str(layer.compute_dtype).removeprefix("torch.")}
    if layer.bits == 4:
        settings.update(double_quant=layer.double_quant, blocksize=layer.blocksize)
    return settings


def bits_per_parameter(model: nn.Module) -> float:
    """Stored bits per weight value over all quantized layers (codes + scales + double-quant state)."""
    layers = [layer for _, layer in quantized_layers(model)]
    if not layers:
        raise ValueError("the model has no QuantLinear layers; call quantize_model(model) first")
    stored = sum(layer.weight_nbytes() for layer in layers)
    values = sum(layer.in_features * layer.out_features for layer in layers)
    return 8 * stored / values
