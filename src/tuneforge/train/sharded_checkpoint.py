"""Checkpoints of FSDP2 runs through ``torch.distributed.checkpoint`` (DCP).

Under FSDP each rank holds 1/W of every trainable weight and AdamW moment (DTensor shards). A
checkpoint's ``sharded/`` folder is one DCP save of ``{"model": trainable weights, "optimizer":
their state}``, keyed by parameter name: every rank writes its own shards in parallel and rank 0
writes the index (``.metadata``), so no rank ever holds the whole state. ``trainer_state.pt`` beside
it (rank 0) holds the rest as in one process (scheduler, RNG, data position), without the optimizer.

DCP loads by name and by global offset, not by who wrote what, so a checkpoint resumes on any world
size: 2 ranks -> 1 process (plain tensors), 1 -> 2, 2 -> 4. A one-process checkpoint
(``weights/weights.safetensors`` + the optimizer in ``trainer_state.pt``) resumes under FSDP by
handing every rank the whole tensors, from which each keeps its shard (full finetuning; an adapter
of a one-process run resumes under DDP).

The folder must be on a file system every rank sees (one machine, or a shared mount across nodes).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import nn

SHARDED = "sharded"


def is_sharded(model: nn.Module) -> bool:
    """True when the model's parameters are FSDP shards (DTensors)."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(param, DTensor) for param in model.parameters())


def trainable_names(model: nn.Module) -> set[str]:
    return {name for name, param in model.named_parameters() if param.requires_grad}


def _state_of(model: nn.Module, optimizer) -> dict:
    """What a sharded checkpoint holds, as (sharded or plain) tensors of this process's model."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    names = trainable_names(model)
    weights = {name: tensor for name, tensor in get_model_state_dict(model).items() if name in names}
    return {"model": weights, "optimizer": get_optimizer_state_dict(model, optimizer)}


def save_sharded(folder: Path, model: nn.Module, optimizer) -> None:
    """Every rank calls this: each writes its shards of the trainable weights and optimizer state."""
    import torch.distributed.checkpoint as dcp

    dcp.save(_state_of(model, optimizer), checkpoint_id=str(folder))


def load_sharded(folder: Path, model: nn.Module, optimizer) -> None:
    """Every rank calls this: each reads the parts of the saved tensors its shards cover."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

    from tuneforge.train.checkpoint import CheckpointError

    state = _state_of(model, optimizer)
    try:
        with warnings.catch_warnings():  # one process reading a sharded checkpoint is what 2 -> 1 means
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(state, checkpoint_id=str(folder))
    except (Exception, CheckpointException) as exc:  # noqa: BLE001 - CheckpointException is a BaseException
        raise CheckpointError(f"{folder} does not fit this run's trainable weights ({_reason(exc)}): it was saved "
                              "by another model or adapter; resume it with the config it was trained with") from None
    set_model_state_dict(model, state["model"], options=StateDictOptions(strict=False))
    set_optimizer_state_dict(model, optimizer, state["optimizer"])


def _reason(exc: BaseException) -> str:
    """The first failure's own message: DCP wraps each rank's exception in a CheckpointException."""
    failures = getattr(exc, "failures", None)
    if failures:
        first = next(iter(failures.values()))  # in one process a wrapper holding .exc; across ranks the exception
        exc = getattr(first, "exc", first)
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:300]


def load_whole_into_shards(weights: dict[str, torch.Tensor], optimizer_state: dict, model: nn.Module, optimizer) -> None:
    """A one-process checkpoint under FSDP: every rank gets the whole tensors and keeps its shard.
    The optimizer's state is keyed by position in one process; here by name, in the same order."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

    whole = StateDictOptions(full_state_dict=True, strict=False)
    set_model_state_dict(model, weights, options=whole)
    set_optimizer_state_dict(model, optimizer, _by_name(optimizer_state, model, optimizer), options=whole)


def _by_name(optimizer_state: dict, model: nn.Module, optimizer) -> dict:
    from tuneforge.train.checkpoint import CheckpointError

    name_of = {id(param): name for name, param in model.named_parameters()}
    groups, state = [], {}
    saved_groups = optimizer_state["param_groups"]
    if [len(g["params"]) for g in saved_groups] != [len(g["params"]) for g in optimizer.param_groups]:
        raise CheckpointError("the checkpoint's optimizer holds other parameters than this run's: it belongs to "
                              "another model or trainable set; resume it with the config it was trained with")
    for saved, live in zip(saved_groups, optimizer.param_groups):
        names = [name_of[id(param)] for param in live["params"]]
        for index, name in zip(saved["params"], names):
            if index in optimizer_state["state"]:
                state[name] = optimizer_state["state"][index]
        groups.append({**saved, "params": names})
    return {"state": state, "param_groups": groups}
