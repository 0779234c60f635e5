"""Full-parameter finetuning (``adapter.method: full``): which weights train, and how they are saved.

- ``select_trainable`` unfreezes the parameters ``adapter.trainable`` and ``adapter.layers`` name and
  freezes the rest (all of them train when neither is given).
- A checkpoint holds the trainable tensors only (``weights.safetensors``): frozen ones never change,
  so resuming needs only these on top of the base model.
- The final model is a transformers directory (safetensors, sharded above 2 GB) that
  ``AutoModelForCausalLM.from_pretrained`` and ``tuneforge serve`` load as a base model.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from tuneforge.adapters.targeting import DEFAULT_LAYER_PATTERNS, layer_index
from tuneforge.config.full_ft import FullConfig
from tuneforge.errors import ConfigError

WEIGHTS_FILE = "weights.safetensors"
MAX_SHARD_SIZE = "2GB"


def is_full_finetune(adapter_config) -> bool:
    return isinstance(adapter_config, FullConfig)


def select_trainable(model: nn.Module, config: FullConfig) -> list[str]:
    """Set ``requires_grad`` from ``config``; returns the trainable parameter names (tied ones once)."""
    chosen = []
    for name, param in model.named_parameters():
        wanted = _named_by(name, config.trainable) and _in_layers(name, config.layers)
        param.requires_grad_(wanted)
        if wanted:
            chosen.append(name)
    if not chosen:
        raise ConfigError(
            f"adapter.trainable={config.trainable!r} with adapter.layers={config.layers!r} selects no parameter of "
            f"{type(model).__name__} (e.g. {next(iter(dict(model.named_parameters())), '?')}): widen the patterns "
            "or leave both out to train every weight")
    return chosen


def _named_by(name: str, trainable: list[str] | str | None) -> bool:
    if trainable is None:
        return True
    if isinstance(trainable, str):
        return re.fullmatch(trainable, name) is not None
    return any(name == entry or f".{entry}." in f".{name}." for entry in trainable)


def _in_layers(name: str, layers: list[int] | None) -> bool:
    """Parameters inside a decoder layer need their index listed; the others are not restricted."""
    if layers is None:
        return True
    index = layer_index(name, DEFAULT_LAYER_PATTERNS)
    return index is None or index in layers


class FullWeights:
    """The weights a full finetune trains, fixed when the run starts.

    Update rules such as BAdam and LISA switch ``requires_grad`` block by block during the run, so
    what a checkpoint must hold is this set, not whatever happens to require grad at save time.
    """

    def __init__(self, model: nn.Module, config: FullConfig):
        self.model = model
        self.names = select_trainable(model, config)

    def state(self) -> dict[str, torch.Tensor]:
        """The trainable tensors by name; a tied weight appears once (safetensors refuses shared storage)."""
        params = dict(self.model.named_parameters())  # named_parameters lists a tied tensor once
        return {name: params[name].detach().contiguous() for name in self.names if name in params}

    def save(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        save_file(self.state(), str(directory / WEIGHTS_FILE))

    def load(self, directory: Path) -> None:
        load_trainable(self.model, directory, set(self.state()))


def load_trainable(model: nn.Module, directory: Path, expected: set[str]) -> None:
    """Copy a checkpoint's tensors into the model; names or shapes that disagree are refused."""
    from tuneforge.train.checkpoint import CheckpointError

    saved = load_weights_file(directory, expected)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, tensor in saved.items():
            if params[name].shape != tensor.shape:
                raise CheckpointError(f"{directory / WEIGHTS_FILE}: {name} has shape {tuple(tensor.shape)}, the model "
                                      f"{tuple(params[name].shape)}: the checkpoint belongs to another model")
            params[name].copy_(tensor)


def load_weights_file(directory: Path, expected: set[str]) -> dict[str, torch.Tensor]:
    """A checkpoint's trainable tensors; names that disagree with ``expected`` are refused."""
    from tuneforge.train.checkpoint import CheckpointError

    if not (directory / WEIGHTS_FILE).is_file():
        raise CheckpointError(f"{directory.parent} holds no {directory.name}/{WEIGHTS_FILE}: it was not saved by a full "
                              "finetune (adapter.method: full); resume it with the adapter it was trained with")
    saved = load_file(str(directory / WEIGHTS_FILE))
    if set(saved) != expected:
        missing, extra = sorted(expected - set(saved)), sorted(set(saved) - expected)
        raise CheckpointError(
            f"{directory / WEIGHTS_FILE} does not hold this run's trainable weights (missing {missing[:3]}, "
            f"unexpected {extra[:3]}): resume with the adapter.trainable/adapter.layers it was saved with")
    return saved


def save_full_model(model: nn.Module, directory: Path, tokenizer=None) -> None:
    """A transformers model directory: config.json, safetensors shards (above 2 GB), the tokenizer."""
    model.save_pretrained(directory, safe_serialization=True, max_shard_size=MAX_SHARD_SIZE)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
