"""What the LoRA-specific continual methods (O-LoRA, InfLoRA, MIGU) share: finding the LoRA factors,
folding earlier tasks' adapters into the base, and the input statistics of each adapted layer."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from torch import nn

from tuneforge.adapters.lora.lora import LoraLinear
from tuneforge.adapters.model import merge_and_unload, wrapped_layers
from tuneforge.adapters.peft_format import load_adapter
from tuneforge.config.schema import TrainConfig
from tuneforge.errors import ConfigError
from tuneforge.losses import hidden_states


def require_lora(config: TrainConfig, method: str) -> None:
    if config.adapter.method != "lora":
        raise ConfigError(f"method.name={method!r} works on LoRA's factors; set train.adapter.method: lora "
                          f"(found {config.adapter.method!r})")


def lora_layers(model: nn.Module, name: str) -> dict[str, LoraLinear]:
    """Adapted layer name -> adapter ``name``'s LoRA factors there (linear layers only)."""
    return {layer_name: layer.adapters[name] for layer_name, layer in wrapped_layers(model)
            if name in layer.adapters and isinstance(layer.adapters[name], LoraLinear)}


def fold_in(base: nn.Module, adapter_dirs: Sequence[Path]) -> nn.Module:
    """The base with earlier tasks' adapters merged in: W + Σ_k ΔW_k, the frozen sum the per-task
    methods keep (adding frozen LoRAs and merging them give the same function)."""
    for index, directory in enumerate(adapter_dirs):
        load_adapter(base, directory, f"earlier-{index}")
    return merge_and_unload(base) if adapter_dirs else base


@torch.no_grad()
def input_covariances(model: nn.Module, layers: Iterable[str], batches: Iterable[dict]) -> dict[str, torch.Tensor]:
    """For each named adapted layer: Σ_tokens x xᵀ of its inputs, (in, in), over the batches' real tokens."""
    modules = dict(model.named_modules())
    sums: dict[str, torch.Tensor] = {}
    mask_holder: dict[str, torch.Tensor] = {}
    handles = []

    def record(layer_name):
        def hook(module, args):
            x = args[0].detach().float()  # (B, T, in)
            keep = mask_holder.get("mask")
            rows = x[keep] if keep is not None and keep.shape == x.shape[:2] else x.reshape(-1, x.shape[-1])
            gram = rows.T @ rows  # (in, in)
            sums[layer_name] = gram if layer_name not in sums else sums[layer_name] + gram
        return hook

    for layer_name in layers:
        handles.append(modules[layer_name].register_forward_pre_hook(record(layer_name)))
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        for batch in batches:
            batch = {key: value.to(device) for key, value in batch.items()}
            mask = batch.get("attention_mask")
            # Padding carries no information about the task's inputs; packed rows (a 4-D mask) have little.
            mask_holder["mask"] = mask.bool() if mask is not None and mask.dim() == 2 else None
            hidden_states(model, batch)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return {name: gram.cpu() for name, gram in sums.items()}


def task_batches(examples, tokenizer, config: TrainConfig, count: int, batch_size: int = 4) -> list[dict]:
    """Up to ``count`` unpacked batches of ``examples`` tokenized as training tokenizes them."""
    from tuneforge.data import BatchPlan, tokenize_examples

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    tokenized = tokenize_examples(examples, tokenizer, template=config.data.template, max_seq_len=config.data.max_seq_len,
                                  train_on=config.data.train_on)
    batches = list(BatchPlan(tokenized, batch_size, packing=False, seed=0, pad_id=pad_id).batches(0))
    return batches[:count]
