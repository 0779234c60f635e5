"""Quantize as the weights load, and save/load already-quantized models.

``load_quantized(model_dir, ...)`` never holds the full-precision model: the module tree is built
on the ``meta`` device (no storage), then each tensor is read from the safetensors files one at a
time; a Linear's weight is quantized right after it is read and only the packed form is kept.
Peak memory is the quantized model plus one layer in full precision.

``save_quantized(model, dir)`` writes the packed buffers as they are (``model.safetensors``), the
model's ``config.json`` and ``tuneforge_quantization.json`` (which modules are quantized and how);
``load_saved_quantized(dir)`` rebuilds the same model without quantizing anything again.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from tuneforge.errors import ModelLoadError
from tuneforge.fileio import atomic_write, atomic_write_json
from tuneforge.quant.allocator import release_free_memory, return_large_buffers_to_os
from tuneforge.quant.blockwise import DoubleQuant, QuantState, quantize_4bit
from tuneforge.quant.int8 import Int8State, quantize_int8
from tuneforge.quant.linear import QuantLinear, check_quant_settings
from tuneforge.quant.model import is_skipped

QUANT_FILE = "tuneforge_quantization.json"
WEIGHTS_FILE = "model.safetensors"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SAFETENSORS_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


class _TensorReader:
    """Random access to the tensors of a (possibly sharded) safetensors checkpoint.

    Each read opens the file, copies one tensor out and closes it again: a file kept open stays
    memory-mapped, and every page read through the mapping would then count in the process's memory
    until the end of the load (the whole checkpoint, for a load that touches every tensor).
    """

    def __init__(self, model_dir: Path):
        files = sorted(model_dir.glob("*.safetensors"))
        if not files:
            raise ModelLoadError(f"{model_dir} holds no .safetensors files; quantized loading reads safetensors "
                                 "checkpoints (convert .bin checkpoints with save_pretrained(safe_serialization=True))")
        self.where: dict[str, Path] = {}
        self._mappings: dict[Path, torch.UntypedStorage] = {}
        for file in files:
            with safe_open(str(file), framework="pt") as handle:
                for key in handle.keys():
                    self.where[key] = file

    def __contains__(self, key: str) -> bool:
        return key in self.where

    def get(self, key: str) -> torch.Tensor:
        with safe_open(str(self.where[key]), framework="pt") as handle:
            return handle.get_tensor(key).clone()  # owned memory, not a view of the mapping

    def mapped(self, key: str, dtype: torch.dtype) -> torch.Tensor | None:
        """``key`` as a view of a private (copy-on-write) mapping of its file, or None when the file
        stores it in another dtype or unaligned. Only the pages a computation touches become resident:
        for an embedding, the rows of the tokens seen, as with transformers' own loading."""
        file = self.where[key]
        with open(file, "rb") as handle:
            header_size = int.from_bytes(handle.read(8), "little")
            entry = json.loads(handle.read(header_size))[key]
        stored = SAFETENSORS_DTYPES.get(entry["dtype"])
        offset = 8 + header_size + entry["data_offsets"][0]
        if stored != dtype or offset % dtype.itemsize:
            return None
        if file not in self._mappings:
            self._mappings[file] = torch.UntypedStorage.from_file(str(file), shared=False, nbytes=file.stat().st_size)
        return torch.empty(0, dtype=dtype).set_(self._mappings[file], offset // dtype.itemsize, entry["shape"])


def _empty_model(model_dir: Path, dtype: torch.dtype) -> nn.Module:
    try:
        config = AutoConfig.from_pretrained(model_dir)
    except (OSError, ValueError) as error:
        raise ModelLoadError(f"cannot read {model_dir / 'config.json'}: {error}") from error
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model


def _set_tensor(model: nn.Module, key: str, value: torch.Tensor) -> None:
    module_name, _, leaf = key.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    current = getattr(module, leaf)
    if isinstance(current, nn.Parameter):
        setattr(module, leaf, nn.Parameter(value.to(current.dtype), requires_grad=current.requires_grad))
    else:
        module._buffers[leaf] = value.to(current.dtype) if current is not None and current.is_floating_point() else value


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def _finish(model: nn.Module, model_dir: Path) -> nn.Module:
    """Tie what the config ties, rebuild meta-only buffers (e.g. rotary inv_freq), check nothing is left on meta."""
    config = model.config
    head, embed = getattr(model, "lm_head", None), model.get_input_embeddings()
    if getattr(config, "tie_word_embeddings", False) and isinstance(head, nn.Linear) and head.weight.is_meta:
        head.weight = embed.weight
    for name, module in list(model.named_modules()):
        meta_buffers = [b for b, t in module._buffers.items() if t is not None and t.is_meta]
        if meta_buffers and not any(p.is_meta for p in module.parameters(recurse=False)):
            try:
                rebuilt = type(module)(config=config)
            except TypeError:
                continue
            if name:
                _replace(model, name, rebuilt)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise ModelLoadError(f"{model_dir}: no weights for {left[:5]} in the checkpoint; is it complete?")
    return model.eval()


def load_quantized(model_dir: str | Path, *, bits: int = 4, quant_type: str = "nf4", double_quant: bool = True,
                   blocksize: int = 64, compute_dtype: torch.dtype = torch.bfloat16,
                   skip_modules: Sequence[str] | None = ("lm_head",), dtype: torch.dtype = torch.float32) -> nn.Module:
    """Load a transformers checkpoint with every non-skipped Linear quantized as it is read."""
    check_quant_settings(bits, quant_type, blocksize, compute_dtype)
    return_large_buffers_to_os()
    model_dir = Path(model_dir)
    model = _empty_model(model_dir, dtype)
    skip = list(skip_modules or [])
    targets = {name for name, module in model.named_modules() if isinstance(module, nn.Linear) and not is_skipped(name, skip)}
    reader = _TensorReader(model_dir)
    for name in sorted(targets):
        linear = model.get_submodule(name)
        weight_key = f"{name}.weight"
        if weight_key not in reader:
            if getattr(model.config, "tie_word_embeddings", False) and linear.weight is model.get_input_embeddings().weight:
                continue  # a tied head: quantized after the embedding is read (below)
            raise ModelLoadError(f"{model_dir}: the checkpoint has no tensor '{weight_key}'")
        weight = reader.get(weight_key).to(dtype)
        state = quantize_int8(weight) if bits == 8 else quantize_4bit(
            weight, quant_type=quant_type, blocksize=blocksize, double_quant=double_quant)
        bias = reader.get(f"{name}.bias").to(dtype) if linear.bias is not None else None
        _replace(model, name, QuantLinear(state, bias, compute_dtype=compute_dtype))
        del weight
    _load_remaining(model, reader)
    _quantize_tied_head(model, targets, bits, quant_type, double_quant, blocksize, compute_dtype)
    model = _finish(model, model_dir)
    release_free_memory()  # the freed full-precision tensors must not stay resident
    return model


def _load_remaining(model: nn.Module, reader: _TensorReader) -> None:
    """Every tensor not inside a QuantLinear (embeddings, norms, skipped layers), read one at a time.

    Embedding tables stay in their file's mapping when it holds them in the model's dtype: a batch
    reads only its tokens' rows, so most of a large vocabulary never needs to be in memory."""
    quantized = {name for name, m in model.named_modules() if isinstance(m, QuantLinear)}
    embeddings = {f"{name}.weight" for name, m in model.named_modules() if isinstance(m, nn.Embedding)}
    for key in [k for k, _ in [*model.named_parameters(), *model.named_buffers()]]:
        if key.rpartition(".")[0] not in quantized and key in reader:
            current = model.get_parameter(key) if key in embeddings else None
            value = reader.mapped(key, current.dtype) if current is not None else None
            _set_tensor(model, key, value if value is not None else reader.get(key))


def _quantize_tied_head(model, targets, bits, quant_type, double_quant, blocksize, compute_dtype) -> None:
    head = getattr(model, "lm_head", None)
    if "lm_head" in targets and isinstance(head, nn.Linear) and head.weight.is_meta:
        weight = model.get_input_embeddings().weight.detach()
        state = quantize_int8(weight) if bits == 8 else quantize_4bit(
            weight, quant_type=quant_type, blocksize=blocksize, double_quant=double_quant)
        _replace(model, "lm_head", QuantLinear(state, None, compute_dtype=compute_dtype))


def _layer_record(layer: QuantLinear) -> dict:
    return {"bits": layer.bits, "quant_type": layer.quant_type, "blocksize": layer.blocksize,
            "double_quant": layer.double_quant, "compute_dtype": str(layer.compute_dtype).removeprefix("torch."),
            "weight_dtype": str(layer.weight_dtype).removeprefix("torch."),
            "shape": [layer.out_features, layer.in_features], "bias": layer.bias is not None}


def save_quantized(model: nn.Module, directory: str | Path, tokenizer=None) -> Path:
    """Write a quantized model (packed buffers as stored) that ``load_saved_quantized`` reads back."""
    directory = Path(directory)
    layers = {name: _layer_record(m) for name, m in model.named_modules() if isinstance(m, QuantLinear)}
    if not layers:
        raise ModelLoadError("the model has no quantized layers; save it with save_pretrained instead")
    state, seen = {}, {}
    for key, tensor in model.state_dict().items():
        if tensor.data_ptr() in seen and tensor.numel() > 0:
            continue  # tied weights are stored once and re-tied on load
        seen[tensor.data_ptr()] = key
        state[key] = tensor.detach().to("cpu").contiguous()
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write(directory / WEIGHTS_FILE, lambda tmp: save_file(state, str(tmp), metadata={"format": "pt"}))
    atomic_write_json(directory / "config.json", model.config.to_dict())
    atomic_write_json(directory / QUANT_FILE, {"format": 1, "layers": layers})
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    return directory


def load_saved_quantized(directory: str | Path) -> nn.Module:
    """Rebuild a model written by ``save_quantized``: packed weights are loaded, never re-quantized."""
    directory = Path(directory)
    path = directory / QUANT_FILE
    if not path.is_file():
        raise ModelLoadError(f"{path} not found: {directory} was not written by save_quantized")
    layers = json.loads(path.read_text(encoding="utf-8"))["layers"]
    model = _empty_model(directory, torch.float32)
    reader = _TensorReader(directory)
    for name, record in layers.items():
        _replace(model, name, _layer_from_file(reader, name, record, directory))
    _load_remaining(model, reader)
    return _finish(model, directory)


def _layer_from_file(reader: _TensorReader, name: str, record: dict, directory: Path) -> QuantLinear:
    def tensor(leaf):
        key = f"{name}.{leaf}"
        if key not in reader:
            raise ModelLoadError(f"{directory / WEIGHTS_FILE}: missing '{key}' for the quantized layer '{name}'")
        return reader.get(key)

    weight_dtype = DTYPES[record["weight_dtype"]]
    if record["bits"] == 8:
        state = Int8State(qweight=tensor("qweight"), absmax=tensor("absmax"), dtype=weight_dtype)
    else:
        second = DoubleQuant(absmax=tensor("absmax2"), offset=tensor("absmax_offset")) if record["double_quant"] else None
        state = QuantState(packed=tensor("qweight"), absmax=tensor("absmax"), shape=torch.Size(record["shape"]),
                           dtype=weight_dtype, blocksize=record["blocksize"], quant_type=record["quant_type"],
                           double_quant=second)
    bias = tensor("bias") if record["bias"] else None
    return QuantLinear(state, bias, compute_dtype=DTYPES[record["compute_dtype"]])
