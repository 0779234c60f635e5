"""Optional ``torch.compile`` of the decoder layers: fuses the memory-bound element-wise work
(RMSNorm, RoPE, SiLU·up, residual adds, the LoRA adds) that costs ~35% of a CPU step.

Only the repeated decoder layers are compiled, each on its own: identical layers share one compiled
graph (parameters are graph inputs), so the compile cost is paid once, ~1 minute on 2 CPU cores.
Packed batches all have the shape (batch_size, max_seq_len), so there is nothing to recompile;
evaluation and generation run eagerly (``eager_only``) because their shapes vary.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn


def decoder_layers(model: nn.Module) -> nn.ModuleList | None:
    """The longest ModuleList whose children all share one class: the transformer blocks."""
    best = None
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) > 1 and len({type(m) for m in module}) == 1:
            if best is None or len(module) > len(best):
                best = module
    return best


def compile_decoder_layers(model: nn.Module) -> int:
    layers = decoder_layers(model)
    if layers is None:
        return 0
    for layer in layers:
        layer.compile(dynamic=False)
    return len(layers)


def eager_only():
    """Run compiled modules eagerly (evaluation, generation: shapes change every batch)."""
    set_stance = getattr(torch.compiler, "set_stance", None)
    return set_stance("force_eager") if set_stance is not None else contextlib.nullcontext()
