"""What BAdam and LISA share: the trainable weights grouped by decoder layer, and switching which
groups train. A rule decides the active set from the step alone, so a resumed run picks the same set."""

from __future__ import annotations

import torch
from torch import nn

from tuneforge.adapters.targeting import DEFAULT_LAYER_PATTERNS, layer_index
from tuneforge.errors import ConfigError
from tuneforge.train.update_rules.base import trainable_params


def params_by_layer(model: nn.Module) -> tuple[dict[int, list[nn.Parameter]], list[nn.Parameter]]:
    """({decoder layer index: its trainable params}, the trainable params outside decoder layers)."""
    names = {id(p): n for n, p in model.named_parameters()}
    layers: dict[int, list[nn.Parameter]] = {}
    outside: list[nn.Parameter] = []
    for param in trainable_params(model):
        index = layer_index(names[id(param)], DEFAULT_LAYER_PATTERNS)
        (outside if index is None else layers.setdefault(index, [])).append(param)
    if not layers:
        raise ConfigError("update_rule.method=badam/lisa switch between decoder layers, but no trainable parameter "
                          "sits in a decoder layer: widen adapter.trainable / adapter.layers")
    return dict(sorted(layers.items())), outside


def activate(all_params: list[nn.Parameter], active: list[nn.Parameter], optimizer: torch.optim.Optimizer,
             forget: bool) -> None:
    """Only ``active`` requires grad; optimizer state of the others is dropped (its memory is the point).
    ``forget`` also drops the state of the active ones (BAdam starts each block's Adam afresh)."""
    keep = {id(p) for p in active}
    for param in all_params:
        param.requires_grad_(id(param) in keep)
        param.grad = None
        if forget or id(param) not in keep:
            optimizer.state.pop(param, None)
