"""Routing each input to one of several per-task adapters by its nearest task centroid.

A task's centroid is the mean, over its training prompts, of the base model's (adapters off)
last hidden state mean-pooled over the prompt's tokens. At evaluation a forward pre-hook on the
backbone embeds each new batch the same way and sets ``AdaptedLayer.row_adapters`` (the per-row
adapter mechanism serving uses) to each row's nearest centroid by cosine similarity; the
generation steps that follow reuse the choice.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from tuneforge.adapters.model import disabled_adapters, wrapped_layers
from tuneforge.continual.methods.lora_layers import task_batches
from tuneforge.losses import backbone_and_head


@torch.no_grad()
def mean_embeddings(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """(B, H): the base model's last hidden state averaged over each row's real tokens."""
    backbone, _ = backbone_and_head(model)
    with disabled_adapters(model):
        hidden = backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
    mask = (attention_mask if attention_mask is not None else torch.ones_like(input_ids)).to(hidden.dtype)  # (B, T)
    return ((hidden * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True).clamp_min(1)).float()


@torch.no_grad()
def prompt_embeddings(model: nn.Module, tokenizer, examples, config, limit: int) -> torch.Tensor:
    """(N, H) embeddings of up to ``limit`` examples' prompts (the tokens before the answer)."""
    rows = []
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    for batch in task_batches(examples[:limit], tokenizer, config, count=10**9, batch_size=8):
        prompt_mask = batch["attention_mask"].clone()
        prompt_mask[batch["labels"] != -100] = 0  # labelled tokens are the answer
        rows.append(mean_embeddings(model, batch["input_ids"].to(device), prompt_mask.to(device)).cpu())
    model.train(was_training)
    return torch.cat(rows)


def nearest(embeddings: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """(B,) index of each row's most cosine-similar centroid."""
    return (F.normalize(embeddings, dim=-1) @ F.normalize(centroids.to(embeddings), dim=-1).T).argmax(-1)


@contextlib.contextmanager
def routed(model: nn.Module, adapter_names: list[str], centroids: torch.Tensor) -> Iterator[nn.Module]:
    """``model`` (holding ``adapter_names``) routing every row to its nearest centroid's adapter."""
    backbone, _ = backbone_and_head(model)
    layers = [layer for _, layer in wrapped_layers(model)]
    busy = []

    def route(module, args, kwargs):
        if busy:
            return None  # the embedding forward below
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if input_ids is None:
            return None
        mask = kwargs.get("attention_mask")
        if mask is not None and (mask.dim() != 2 or mask.shape[1] != input_ids.shape[1]):
            return None  # a decoding step (the mask covers the cached tokens too): keep the prompt's choice
        busy.append(True)
        try:
            choice = nearest(mean_embeddings(model, input_ids, mask), centroids)
        finally:
            busy.pop()
        names = [adapter_names[i] for i in choice.tolist()]
        for layer in layers:
            layer.row_adapters = names
        return None

    handle = backbone.register_forward_pre_hook(route, with_kwargs=True)
    try:
        yield model
    finally:
        handle.remove()
        for layer in layers:
            layer.row_adapters = None
