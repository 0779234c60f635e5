"""FSDP2 full finetuning without a whole model on any rank.

Loading the model whole on every rank and sharding it afterwards makes each rank's peak hold the whole
model once, and the allocator keeps much of what sharding frees. Instead, as PyTorch's FSDP2 recipe
describes (``fully_shard`` on meta-device modules, then ``to_empty``), the model is built with its
parameters on the meta device (buffers such as rotary frequencies stay real: they are computed, not
loaded), sharded, given empty local storage (tied weights kept tied), and each rank then reads only its own rows of each weight
from the safetensors files (``safe_open(...).get_slice``), one tensor at a time.

FSDP2 shards every parameter on dim 0 the way ``torch.chunk`` splits it: rank r holds rows
[r*c, min((r+1)*c, n)) with c = ceil(n / world size). Under HSDP, r and the world size are those of the
mesh's shard dimension. With CPU offload the storage is given on the CPU, where FSDP keeps the shards.
"""

from __future__ import annotations

import json
import math
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

from tuneforge.errors import ModelLoadError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


@dataclass
class ShardedLoad:
    """The model directory a sharded load reads from, and the dtype the weights train in."""

    source: str  # what the user wrote (for messages)
    directory: Path
    dtype: torch.dtype

    def empty_model(self):
        """(model with meta parameters and real buffers, tokenizer)."""
        from tuneforge.models import load_tokenizer
        from tuneforge.models.special_tokens import configure_generation_stops

        tokenizer = load_tokenizer(str(self.directory))
        try:
            model_config = AutoConfig.from_pretrained(self.directory)
            with parameters_on_meta():
                model = AutoModelForCausalLM.from_config(model_config, dtype=self.dtype)
            if (self.directory / "generation_config.json").is_file():  # as from_pretrained reads it
                model.generation_config = GenerationConfig.from_pretrained(self.directory)
        except (OSError, ValueError, KeyError) as error:
            raise ModelLoadError(f"Cannot build the model {self.source!r} from {self.directory}: {error}. Check its "
                                 "config.json, or set distributed.fsdp.load_shards: false to load it whole.") from error
        configure_generation_stops(model.generation_config, tokenizer)
        return model, tokenizer

    def fill(self, model: nn.Module, device: torch.device) -> None:
        """Give the sharded meta parameters storage on ``device`` and read this rank's rows into them."""
        _give_storage(model, device)
        files = weight_files(self.directory)
        by_file: dict[Path, list[tuple[str, str, nn.Parameter]]] = {}
        for name, param in model.named_parameters():
            key, path = _checkpoint_key(name, files, self.source)
            by_file.setdefault(path, []).append((name, key, param))
        with torch.no_grad():
            for path, wanted in by_file.items():
                with safe_open(str(path), framework="pt") as weights:
                    for name, key, param in wanted:
                        _read_local_rows(param, weights.get_slice(key), name, path)


def plan_sharded_load(config, strategy) -> ShardedLoad | None:
    """A sharded load for FSDP full finetuning of a safetensors model directory; None means load whole."""
    from tuneforge.models import resolve_model_dir
    from tuneforge.models.placement import parse_dtype
    from tuneforge.train.full import is_full_finetune

    if not strategy.shards_state or not config.distributed.fsdp.load_shards:
        return None
    if not is_full_finetune(config.adapter) or config.quantization is not None:
        return None
    directory = resolve_model_dir(config.model)
    if not weight_files(directory):
        return None  # a checkpoint in another format: transformers loads it whole
    dtype = parse_dtype(config.dtype)
    if dtype == "auto":
        dtype = _saved_dtype(directory)
    return ShardedLoad(config.model, directory, dtype)


def weight_files(directory: Path) -> dict[str, Path]:
    """Checkpoint key -> the safetensors file holding it; empty when the directory has none."""
    index = directory / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError, TypeError) as error:
            raise ModelLoadError(f"{index} is not a safetensors index (no 'weight_map'): {error}. "
                                 "Save the model again with save_pretrained.") from error
        return {key: directory / name for key, name in weight_map.items()}
    single = directory / SINGLE_FILE
    if not single.is_file():
        return {}
    with safe_open(str(single), framework="pt") as weights:
        return {key: single for key in weights.keys()}


@contextmanager
def parameters_on_meta():
    """Modules built inside get their parameters on the meta device; buffers are created as usual.

    ``torch.device("meta")`` would put buffers there too, and the computed ones (rotary frequencies)
    are in no checkpoint to be read back."""
    register = nn.Module.register_parameter

    def register_on_meta(module, name, param):
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    nn.Module.register_parameter = register_on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def has_meta_parameters(model: nn.Module) -> bool:
    return any(param.is_meta for param in model.parameters())


def _give_storage(model: nn.Module, device: torch.device) -> None:
    """Empty storage on ``device`` for every meta parameter, as ``Module.to_empty`` gives, but a parameter
    shared by several modules (tied embeddings) stays one parameter, and buffers are left as they are."""
    from tuneforge.train.strategy import swap_parameters

    def empty(_, param):
        if not param.is_meta:
            return None
        return nn.Parameter(torch.empty_like(param, device=device), requires_grad=param.requires_grad)

    swap_parameters(model, empty)


def _checkpoint_key(name: str, files: dict[str, Path], source: str) -> tuple[str, Path]:
    if name in files:
        return name, files[name]
    _, _, bare = name.partition(".")  # a base model saved without its head's prefix ("model.")
    if bare in files:
        return bare, files[bare]
    raise ModelLoadError(f"The weights of {source!r} have no tensor {name!r}, which the model's config needs, so it "
                         "cannot be read shard by shard. Set distributed.fsdp.load_shards: false to load it whole "
                         "(transformers then reports what is missing).")


def _read_local_rows(param: nn.Parameter, saved, name: str, path: Path) -> None:
    """Copy this rank's dim-0 rows of ``saved`` (a safetensors slice) into the sharded ``param``."""
    from torch.distributed.tensor import DTensor

    shape = tuple(saved.get_shape())
    if shape != tuple(param.shape):
        raise ModelLoadError(f"{path}: tensor {name!r} has shape {list(shape)}, but the model's config makes it "
                             f"{list(param.shape)}. The config.json and the weights disagree; save the model again.")
    if not isinstance(param, DTensor):  # a parameter FSDP left whole
        param.copy_(saved[:])
        return
    local = param.to_local()
    rank, world = _shard_coordinate(param)
    rows_per_rank = math.ceil(shape[0] / world)
    start = min(rank * rows_per_rank, shape[0])
    stop = min(start + rows_per_rank, shape[0])
    if local.shape[0] != stop - start:
        raise RuntimeError(f"{name}: FSDP gave rank {rank} {local.shape[0]} rows, expected {stop - start}")
    if stop > start:
        local.copy_(saved[start:stop])


def _shard_coordinate(param) -> tuple[int, int]:
    """(this rank's index, the number of shards) along the mesh dimension that shards dim 0. Under HSDP the
    mesh is replicas x shards and the other dimension replicates: every replica group holds the same rows."""
    from torch.distributed.tensor import Shard

    for mesh_dim, placement in enumerate(param.placements):
        if isinstance(placement, Shard):
            return param.device_mesh.get_local_rank(mesh_dim), param.device_mesh.size(mesh_dim)
    return 0, 1  # replicated on every mesh dimension: the whole tensor


def _saved_dtype(directory: Path) -> torch.dtype:
    """The dtype config.json records (``dtype`` or ``torch_dtype``), float32 when it records none."""
    try:
        recorded = json.loads((directory / "config.json").read_text())
    except ValueError as error:
        raise ModelLoadError(f"{directory / 'config.json'} is not valid JSON: {error}") from error
    name = recorded.get("dtype") or recorded.get("torch_dtype") or "float32"
    dtype = getattr(torch, str(name), None)
    return dtype if isinstance(dtype, torch.dtype) else torch.float32
