"""Adapter files in the HF PEFT format: ``adapter_config.json`` + ``adapter_model.safetensors``.

Keys are ``base_model.model.<module path>.<leaf>`` with PEFT's leaf names (``lora_A.weight``,
``lora_magnitude_vector``, ``lora_embedding_A``) and ``modules_to_save`` copies stored under the
module's own names, so files move freely between tuneforge, peft, vLLM and LoRAX.

What only tuneforge needs to know about how an adapter was trained (the quantized base of a QLoRA
run) goes into a sidecar, ``tuneforge_training.json``, so adapter_config.json holds PEFT's keys alone.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from tuneforge.adapters.config import AdapterConfig
from tuneforge.adapters.model import (
    add_adapter,
    adapter_book,
    delete_adapter,
    saved_module_copies,
    set_trainable_adapter,
    wrapped_layers,
)
from tuneforge.adapters.model_level import load_model_adapter_tensors, model_adapter_peft_fields, model_adapter_state
from tuneforge.adapters.registry import get_method, method_for_peft_type
from tuneforge.adapters.targeting import ALL_NORMS, candidate_modules, name_matches, peft_would_target
from tuneforge.errors import AdapterError, ConfigError
from tuneforge.fileio import atomic_write, atomic_write_json, atomic_write_text
from tuneforge.quant.model import quantization_of, quantized_layers
from tuneforge.quant.presets import preset_for, settings_beyond_preset

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
TRAINING_FILE = "tuneforge_training.json"
PREFIX = "base_model.model."
# Tensors a method keeps once per adapter rather than once per layer (VeRA's projections, VB-LoRA's
# vector bank) sit right under the tuner: ``base_model.vera_A``.
MODEL_LEVEL_PREFIX = "base_model."


class QuantizedTrainingWarning(UserWarning):
    """An adapter trained on a quantized base (QLoRA) was loaded onto a full-precision one: it works,
    with outputs slightly different from training's. A category of its own so that callers who do
    this on purpose (export's dequantize-merge) can silence exactly this note."""


@runtime_checkable
class SharesFileTensors(Protocol):
    """A layer adapter whose method also stores model-level tensors, shared by all its layers."""

    def shared_file_tensors(self) -> dict[str, torch.Tensor]:
        """Leaf name under ``base_model.`` -> tensor; every layer of one adapter returns the same ones."""

    def load_shared_file_tensors(self, tensors: dict[str, torch.Tensor], path: Path) -> set[str]:
        """Take what this adapter needs from the file's model-level tensors; returns the leaves used."""


def adapter_state(model: nn.Module, name: str) -> dict[str, torch.Tensor]:
    """Adapter ``name``'s tensors under PEFT's file keys."""
    state = {}
    for layer_name, layer in wrapped_layers(model):
        if name in layer.adapters:
            adapter = layer.adapters[name]
            for leaf, tensor in adapter.file_tensors().items():
                state[f"{PREFIX}{layer_name}.{leaf}"] = tensor
            if isinstance(adapter, SharesFileTensors):
                for leaf, tensor in adapter.shared_file_tensors().items():
                    state[f"{MODEL_LEVEL_PREFIX}{leaf}"] = tensor
    for module_name, copies in saved_module_copies(model):
        if name in copies.modules_to_save:
            for leaf, tensor in copies.file_tensors(name).items():
                state[f"{PREFIX}{module_name}.{leaf}"] = tensor
    state.update(model_adapter_state(model, name))  # model-level methods name their full keys
    return state


def save_adapter(model: nn.Module, directory: str | Path, name: str = "default", *,
                 base_model_name: str | None = None, base_quantization: dict | None = None) -> Path:
    """Write adapter ``name`` to ``directory`` (each file atomically) with a model card.

    ``base_quantization``: the ``quantization:`` settings of the base the adapter was trained on
    (QLoRA); by default they are read off the model's quantized layers, if it has any. They are
    recorded in ``tuneforge_training.json`` so that ``load_adapter`` can say when the adapter meets
    a full-precision base.
    """
    book = adapter_book(model)
    if name not in book.configs:
        raise AdapterError(f"no adapter named '{name}' to save; the model has {list(book.configs) or 'no adapters'}")
    directory = Path(directory)
    config = book.configs[name]
    state = {k: v.detach().to("cpu").contiguous() for k, v in adapter_state(model, name).items()}
    peft_config = peft_loadable_targeting(model, name, config.to_peft_dict())
    if any(getattr(layer.adapters[name], "transposed", False) for _, layer in wrapped_layers(model) if name in layer.adapters):
        peft_config["fan_in_fan_out"] = True  # PEFT expects the flag for GPT-2's Conv1D layers
    peft_config.update(model_adapter_peft_fields(model, name))
    peft_config.update(
        base_model_name_or_path=base_model_name or _base_model_name(model),
        task_type=_task_type(model),
        inference_mode=True,
    )
    quantization = base_quantization if base_quantization is not None else quantization_of(model)
    atomic_write(directory / WEIGHTS_FILE, lambda tmp: save_file(state, str(tmp), metadata={"format": "pt"}))
    atomic_write_json(directory / CONFIG_FILE, peft_config)
    atomic_write_text(directory / "README.md", _model_card(config, peft_config, state, quantization))
    _write_training_record(directory, quantization)
    return directory


def peft_loadable_targeting(model: nn.Module, name: str, peft_config: dict) -> dict:
    """``peft_config`` with its targeting fields in a form every peft config class accepts.

    peft's configs (LoraConfig, AdaLoraConfig, HRAConfig, ... ``__post_init__``) refuse a string
    target_modules (a regex or ``all-linear``) beside layers_to_transform or layers_pattern, and
    layers_pattern without layers_to_transform; and peft reads tuneforge's ``all-norms`` as a regex
    that matches nothing. So such a target is written as the list of modules adapter ``name`` wraps,
    as peft itself saves an all-linear config: leaf names (``q_proj``, ...) where peft would select
    exactly these modules with them, else the full module names, which peft matches exactly whatever
    the layer fields say. A list with layers_to_transform that peft would read differently (it finds
    a layer index by another rule than ours, see ``peft_would_target``) is rewritten the same way.
    """
    config = dict(peft_config)
    if config.get("layers_to_transform") is None and config.get("layers_pattern") is not None:
        config["layers_pattern"] = None  # without layer indices it selects nothing, in tuneforge and peft
    target, layers = config.get("target_modules"), config.get("layers_to_transform")
    refused = isinstance(target, str) and (layers is not None or target == ALL_NORMS)
    if not refused and (not isinstance(target, list) or layers is None):
        return config  # a regex, all-linear or list without layer indices means the same to peft
    adapted = [layer_name for layer_name, layer in wrapped_layers(model) if name in layer.adapters]
    if not adapted or (not refused and _peft_selects(model, config) == set(adapted)):
        return config
    leaves = sorted({layer_name.rpartition(".")[2] for layer_name in adapted})
    by_leaves = _with_targets(config, leaves, adapted)
    if by_leaves is not None and _peft_selects(model, by_leaves) == set(adapted):
        return by_leaves
    return _with_targets(config, adapted, adapted)


def _with_targets(config: dict, entries: list[str], adapted: list[str]) -> dict | None:
    """``config`` targeting ``entries``; IA3's list of feedforward_modules rewritten in the same terms."""
    written = {**config, "target_modules": entries}
    if isinstance(config.get("feedforward_modules"), list):
        written["feedforward_modules"] = _feedforward_entries(entries, adapted, config["feedforward_modules"])
        if written["feedforward_modules"] is None:
            return None
    return written


def _peft_selects(model: nn.Module, peft_config: dict) -> set[str]:
    return {module_name for module_name, _ in candidate_modules(model) if peft_would_target(module_name, peft_config)}


def _feedforward_entries(entries: list[str], adapted: list[str], feedforward: list[str]) -> list[str] | None:
    """IA3's feedforward_modules as a sub-list of ``entries`` (peft requires a subset of target_modules);
    None when an entry covers feedforward and other modules alike, so ``entries`` cannot tell them apart."""
    chosen = []
    for entry in entries:
        covered = {module for module in adapted if module == entry or module.endswith("." + entry)}
        feedforward_covered = {module for module in covered if name_matches(feedforward, module)}
        if feedforward_covered == covered:
            chosen.append(entry)
        elif feedforward_covered:
            return None
    return chosen


def _write_training_record(directory: Path, base_quantization: dict | None) -> None:
    path = directory / TRAINING_FILE
    if base_quantization is None:
        path.unlink(missing_ok=True)  # an earlier QLoRA adapter saved here must not lend this one its record
        return
    atomic_write_json(path, {"base_quantization": dict(base_quantization)})


def read_base_quantization(directory: str | Path) -> dict | None:
    """The ``quantization:`` settings of the base the adapter was trained on, from
    ``tuneforge_training.json``; None for an adapter trained on a full-precision base (or saved by peft)."""
    path = Path(directory) / TRAINING_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path} is not valid JSON ({exc}); re-save the adapter, or delete the file "
                          "(it only records how the adapter was trained)") from None
    section = data.get("base_quantization") if isinstance(data, dict) else None
    if section is not None and not isinstance(section, dict):
        raise ConfigError(f"{path}: 'base_quantization' must be a JSON object of quantization settings "
                          f"(e.g. {{\"bits\": 4, \"type\": \"nf4\"}}), found {type(section).__name__}")
    return dict(section) if section else None


def _base_model_name(model: nn.Module) -> str | None:
    config = getattr(model, "config", None)
    return getattr(config, "_name_or_path", None) or None


def _task_type(model: nn.Module) -> str | None:
    return "CAUSAL_LM" if type(model).__name__.endswith("ForCausalLM") else None


def _model_card(config: AdapterConfig, peft_config: dict, state: dict[str, torch.Tensor],
                base_quantization: dict | None) -> str:
    params = sum(t.numel() for t in state.values())
    base = peft_config.get("base_model_name_or_path") or "(not recorded)"
    quantized = (f"- trained on an {preset_for(base_quantization)}-quantized base (QLoRA); load the base with "
                 f"`--quantize {preset_for(base_quantization)}` to match training\n" if base_quantization else "")
    return (
        f"---\nlibrary_name: peft\nbase_model: {base}\ntags: [tuneforge, {config.method}]\n---\n\n"
        f"# {config.method} adapter\n\nTrained with tuneforge. Base model: `{base}`.\n\n"
        f"- method: `{config.method}`\n- tensors: {len(state)}, parameters: {params:,}\n"
        f"- config: `{json.dumps(config.model_dump(exclude_defaults=True), default=str)}`\n{quantized}\n"
        "Load with tuneforge (`tuneforge.adapters.load_adapter`) or with `peft.PeftModel.from_pretrained`.\n"
    )


def read_adapter_config(directory: str | Path) -> AdapterConfig:
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise AdapterError(f"{path} not found: an adapter directory needs {CONFIG_FILE} and {WEIGHTS_FILE}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path} is not valid JSON ({exc}); re-save the adapter or fix the file") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a JSON object, found {type(data).__name__}")
    spec = _method_for(data, path)
    return spec.config_class.from_peft_dict(data, source=str(path))


def _method_for(data: dict, path: Path):
    if "tuneforge_method" in data:
        return get_method(data["tuneforge_method"])
    peft_type = data.get("peft_type")
    spec = method_for_peft_type(peft_type) if peft_type else None
    if spec is None:
        raise ConfigError(f"{path}: peft_type={peft_type!r} is not a method tuneforge can load")
    return spec


def read_adapter_tensors(directory: str | Path) -> dict[str, torch.Tensor]:
    path = Path(directory) / WEIGHTS_FILE
    if not path.is_file():
        legacy = Path(directory) / "adapter_model.bin"
        hint = " (found adapter_model.bin: re-save it as safetensors with peft)" if legacy.exists() else ""
        raise AdapterError(f"{path} not found{hint}")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise AdapterError(f"{path} is corrupt or truncated ({exc}); re-save or re-copy the adapter file") from None


def load_adapter(model: nn.Module, directory: str | Path, name: str = "default", *,
                 trainable: bool = False, activate: bool = True) -> AdapterConfig:
    """Add the adapter stored in ``directory`` (saved by tuneforge or by peft) as ``name``.

    An adapter trained on a quantized base (QLoRA) loads onto a full-precision base too, with one note
    saying so (see ``quantized_training_note``).
    """
    config = read_adapter_config(directory)
    tensors = read_adapter_tensors(directory)
    base_quantization = read_base_quantization(directory)
    add_adapter(model, config, name, activate=activate)
    try:
        fill_adapter_weights(model, name, tensors, Path(directory) / WEIGHTS_FILE)
    except BaseException:
        delete_adapter(model, name)  # never leave a half-loaded adapter behind
        raise
    set_trainable_adapter(model, name if trainable else None)
    if base_quantization is not None and not quantized_layers(model):
        # A warning, not an error: the adapter is correct on the float base, only not bit-for-bit what training saw.
        warnings.warn(quantized_training_note(directory, base_quantization), QuantizedTrainingWarning, stacklevel=2)
    return config


def quantized_training_note(directory: str | Path, base_quantization: dict) -> str:
    """What to tell a user who loads a QLoRA adapter onto a full-precision base, and how to match training."""
    preset = preset_for(base_quantization)
    note = (f"{directory}: this adapter was trained on an {preset}-quantized base (QLoRA) and is now loaded onto a "
            f"full-precision base. That works, but its outputs differ slightly from those in training, where the "
            f"base weights were rounded to {preset}. To match training exactly, load the base quantized: "
            f"--quantize {preset} for tuneforge eval, serve and chat")
    extra = settings_beyond_preset(base_quantization)
    if extra:
        listed = ", ".join(f"{key}={value!r}" for key, value in extra.items())
        return (f"{note}; the run also set {listed}, which the flag does not, so in Python pass them to "
                f"load_model(..., quantization=...) instead.")
    return f"{note}, or load_model(..., quantization=...) in Python."


def load_adapter_weights(model: nn.Module, directory: str | Path, name: str = "default") -> None:
    """Overwrite the weights of the existing adapter ``name`` from a saved adapter (checkpoint resume)."""
    fill_adapter_weights(model, name, read_adapter_tensors(directory), Path(directory) / WEIGHTS_FILE)


def fill_adapter_weights(model: nn.Module, name: str, tensors: dict[str, torch.Tensor], path: Path) -> None:
    remaining = dict(tensors)
    for layer_name, layer in wrapped_layers(model):
        if name not in layer.adapters:
            continue
        where = f"{PREFIX}{layer_name}"
        own = {k[len(where) + 1:]: remaining.pop(k) for k in list(remaining) if k.startswith(where + ".")
               and not k[len(where) + 1:].startswith("base_layer.")}
        try:
            layer.adapters[name].load_file_tensors(own, where)
        except AdapterError as exc:
            raise AdapterError(f"{path}: {exc}") from None
    for module_name, copies in saved_module_copies(model):
        if name in copies.modules_to_save:
            where = f"{PREFIX}{module_name}"
            own = {k[len(where) + 1:]: remaining.pop(k) for k in list(remaining) if k.startswith(where + ".")}
            _load_module_copy(copies.modules_to_save[name], own, where, path)
    load_model_adapter_tensors(model, name, remaining, path)
    _load_shared_tensors(model, name, remaining, path)
    overrides = _checked_base_layer_overrides(model, remaining, path)  # checked before any base weight changes
    if remaining:
        raise AdapterError(
            f"{path}: tensors {sorted(remaining)[:5]} match no adapted module of this model; "
            "the adapter was made for a different base model or target_modules"
        )
    _write_base_layer_overrides(overrides, path)


def _load_shared_tensors(model: nn.Module, name: str, remaining: dict[str, torch.Tensor], path: Path) -> None:
    """Model-level tensors go to every layer adapter that shares them; what none uses stays unmatched."""
    shared = {k[len(MODEL_LEVEL_PREFIX):]: v for k, v in remaining.items()
              if k.startswith(MODEL_LEVEL_PREFIX) and not k.startswith(PREFIX)}
    used: set[str] = set()
    for _, layer in wrapped_layers(model):
        adapter = layer.adapters[name] if name in layer.adapters else None
        if isinstance(adapter, SharesFileTensors):
            used |= adapter.load_shared_file_tensors(shared, path)
    for leaf in used:
        remaining.pop(MODEL_LEVEL_PREFIX + leaf, None)


def _load_module_copy(module: nn.Module, tensors: dict[str, torch.Tensor], where: str, path: Path) -> None:
    own = module.state_dict()
    for key, target in own.items():
        if key not in tensors:
            raise AdapterError(f"{path}: no tensor '{where}.{key}' for modules_to_save (shape {tuple(target.shape)})")
        if tensors[key].shape != target.shape:
            raise AdapterError(
                f"{path}: tensor '{where}.{key}' has shape {tuple(tensors[key].shape)} in the file but "
                f"{tuple(target.shape)} in this model: the adapter was made for a different base model"
            )
    module.load_state_dict({k: v.to(own[k].dtype) for k, v in tensors.items() if k in own})


def _checked_base_layer_overrides(model: nn.Module, remaining: dict[str, torch.Tensor],
                                  path: Path) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """PEFT saves whole embedding matrices beside an embedding LoRA (``...base_layer.weight``); take
    them out of `remaining` and check every one (the module and weight exist, shapes agree) before
    any is written, so a bad file never leaves the base half-overwritten."""
    overrides = []
    for key in [k for k in remaining if ".base_layer." in k]:
        module_path, _, leaf = key[len(PREFIX):].rpartition(".")
        try:
            current = getattr(model.get_submodule(module_path), leaf)
        except AttributeError:
            raise AdapterError(f"{path}: '{key}' names base weights this model does not have at that path "
                               "(no adapter wraps that module); the adapter was made for another base model") from None
        if not isinstance(current, torch.Tensor) or current.shape != remaining[key].shape:
            found = tuple(current.shape) if isinstance(current, torch.Tensor) else type(current).__name__
            raise AdapterError(f"{path}: '{key}' has shape {tuple(remaining[key].shape)}, model has {found}")
        overrides.append((key, current, remaining.pop(key)))
    return overrides


def _write_base_layer_overrides(overrides: list[tuple[str, torch.Tensor, torch.Tensor]], path: Path) -> None:
    for key, current, stored in overrides:
        if not torch.equal(current.detach().cpu(), stored.to(current.dtype)):
            warnings.warn(f"{path}: replacing base weights '{key[len(PREFIX):]}' with the copy stored in the adapter")
            with torch.no_grad():
                current.copy_(stored)
