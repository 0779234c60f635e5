"""Model-level adapter operations: add, activate, disable, delete, merge, unmerge, unload.

All state lives in the wrapped layers plus one small ``AdapterBook`` on the model (the configs
and the active names); these functions are the only way to change it.
"""

from __future__ import annotations

import contextlib
import itertools
import re
from collections.abc import Iterator
from dataclasses import dataclass, field

from torch import nn

from tuneforge.adapters.config import AdapterConfig
from tuneforge.adapters.layer import AdaptedLayer
from tuneforge.adapters.model_level import (
    CONTAINER_ATTRIBUTE,
    attach_model_adapter,
    backbone_of,
    detach_model_adapter,
    model_adapters,
    refuse_merge,
    set_active_model_adapters,
    set_model_adapters_disabled,
)
from tuneforge.adapters.registry import get_method
from tuneforge.adapters.saved_modules import SavedModuleCopies
from tuneforge.adapters.targeting import name_matches, select_targets
from tuneforge.errors import AdapterError

BOOK_ATTRIBUTE = "tuneforge_adapters"
ADAPTER_NAME = re.compile(r"[A-Za-z0-9_-]+")


@dataclass
class AdapterBook:
    configs: dict[str, AdapterConfig] = field(default_factory=dict)
    active: list[str] = field(default_factory=list)


def adapter_book(model: nn.Module) -> AdapterBook:
    book = getattr(model, BOOK_ATTRIBUTE, None)
    if book is None:
        book = AdapterBook()
        # A plain attribute, not a submodule: it must not appear in state_dict or .modules().
        object.__setattr__(model, BOOK_ATTRIBUTE, book)
    return book


def adapter_names(model: nn.Module) -> list[str]:
    return list(adapter_book(model).configs)


def wrapped_layers(model: nn.Module) -> Iterator[tuple[str, AdaptedLayer]]:
    for name, module in model.named_modules():
        if isinstance(module, AdaptedLayer):
            yield name, module


def saved_module_copies(model: nn.Module) -> Iterator[tuple[str, SavedModuleCopies]]:
    for name, module in model.named_modules():
        if isinstance(module, SavedModuleCopies):
            yield name, module


def add_adapter(model: nn.Module, config: AdapterConfig, name: str = "default", *, activate: bool = True,
                **attach_options) -> list[str]:
    """Wrap the modules ``config`` targets with a new adapter ``name``; returns the wrapped module names.

    The base model is frozen; only the new adapter (and its ``modules_to_save`` copies) train.
    ``attach_options`` go to a model-level method's ``attach`` (e.g. ``tokenizer=`` for prompt tuning's text init).
    """
    book = adapter_book(model)
    if not ADAPTER_NAME.fullmatch(name):
        raise AdapterError(f"adapter name {name!r} may use only letters, digits, '_' and '-'")
    if name in book.configs:
        raise AdapterError(f"model already has an adapter named '{name}'; delete_adapter(model, '{name}') first or pick another name")
    method = get_method(config.method)
    if method.attach is not None:
        _check_saved_targets(model, config)
        targets, new_layers = [], {}
        model_adapter = method.attach(model, config, name, **attach_options)
    else:
        if attach_options:
            raise AdapterError(f"adapter method '{config.method}' takes no add_adapter options; got {sorted(attach_options)}")
        targets = select_targets(model, config, method.supported_layers())
        _check_saved_targets(model, config)
        new_layers = {target: method.build(_base_of(model.get_submodule(target)), config, target) for target in targets}
        model_adapter = None
    for param in model.parameters():
        param.requires_grad_(False)
    if model_adapter is not None:
        attach_model_adapter(model, model_adapter.to(device=_device_of(backbone_of(model))).train(model.training), name)
    for target, layer_adapter in new_layers.items():
        wrapper = _wrap(model, target)
        # New modules follow the model's train/eval mode (dropout must stay off in eval).
        wrapper.adapters[name] = layer_adapter.to(device=_device_of(wrapper.base_layer)).train(wrapper.base_layer.training)
    _add_saved_copies(model, config, name)
    book.configs[name] = config
    if activate:
        set_active_adapters(model, [name])
    set_trainable_adapter(model, name)
    return targets


def _device_of(module: nn.Module):
    """Device of a layer's tensors, without touching ``.weight`` (a quantized layer would dequantize it)."""
    return next(itertools.chain(module.parameters(), module.buffers())).device


def _base_of(module: nn.Module) -> nn.Module:
    return module.base_layer if isinstance(module, AdaptedLayer) else module


def _wrap(model: nn.Module, target: str) -> AdaptedLayer:
    module = model.get_submodule(target)
    if isinstance(module, AdaptedLayer):
        return module
    wrapper = AdaptedLayer(module).train(module.training)
    _replace_submodule(model, target, wrapper)
    return wrapper


def _replace_submodule(model: nn.Module, target: str, new: nn.Module) -> None:
    parent_name, _, child = target.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _saved_targets(model: nn.Module, config: AdapterConfig) -> list[str]:
    if not config.modules_to_save:
        return []
    inside = [name for name, _ in saved_module_copies(model)]
    return [
        name for name, _ in model.named_modules()
        if name and name_matches(config.modules_to_save, name)
        and not any(name.startswith(prefix + ".") for prefix in inside)
    ]


def _check_saved_targets(model: nn.Module, config: AdapterConfig) -> None:
    if config.modules_to_save and not _saved_targets(model, config):
        raise AdapterError(
            f"modules_to_save={config.modules_to_save} matched no module of {type(model).__name__}; "
            "use module names such as 'lm_head' or 'embed_tokens'"
        )


def _add_saved_copies(model: nn.Module, config: AdapterConfig, name: str) -> None:
    for module_name in _saved_targets(model, config):
        module = model.get_submodule(module_name)
        if not isinstance(module, SavedModuleCopies):
            module = SavedModuleCopies(module).train(module.training)
            _replace_submodule(model, module_name, module)
        module.add_copy(name)


def set_active_adapters(model: nn.Module, names: list[str] | str) -> None:
    names = [names] if isinstance(names, str) else list(names)
    book = adapter_book(model)
    unknown = [n for n in names if n not in book.configs]
    if unknown:
        raise AdapterError(f"unknown adapter(s) {unknown}; the model has {list(book.configs) or 'no adapters'}")
    set_active_model_adapters(model, names)
    book.active = names
    for _, layer in wrapped_layers(model):
        layer.active = [n for n in names if n in layer.adapters]
    for _, copies in saved_module_copies(model):
        copies.active = list(names)


def set_trainable_adapter(model: nn.Module, name: str | None) -> None:
    """Make exactly adapter ``name`` trainable (None: nothing); the base always stays frozen."""
    for _, layer in wrapped_layers(model):
        for adapter_name, adapter in layer.adapters.items():
            adapter.requires_grad_(adapter_name == name)
    for _, copies in saved_module_copies(model):
        for adapter_name, replica in copies.modules_to_save.items():
            replica.requires_grad_(adapter_name == name)
    for adapter_name, model_adapter in model_adapters(model):
        model_adapter.requires_grad_(adapter_name == name)


@contextlib.contextmanager
def disabled_adapters(model: nn.Module) -> Iterator[None]:
    """Run the base model alone; merged adapters are unmerged for the duration and merged back."""
    merged = {name: list(layer.merged) for name, layer in wrapped_layers(model)}
    if any(merged.values()):
        unmerge_adapters(model)
    switches = [m for _, m in wrapped_layers(model)] + [m for _, m in saved_module_copies(model)]
    for module in switches:
        module.disabled = True
    set_model_adapters_disabled(model, True)
    try:
        yield
    finally:
        set_model_adapters_disabled(model, False)
        for module in switches:
            module.disabled = False
        for name, names in merged.items():
            if names:
                model.get_submodule(name).merge(names, safe=False)


def delete_adapter(model: nn.Module, name: str) -> None:
    book = adapter_book(model)
    if name not in book.configs:
        raise AdapterError(f"no adapter named '{name}'; the model has {list(book.configs) or 'no adapters'}")
    for layer_name, layer in list(wrapped_layers(model)):
        if name in layer.merged:
            raise AdapterError(f"adapter '{name}' is merged into '{layer_name}'; unmerge_adapters(model) first")
        if name in layer.adapters:
            del layer.adapters[name]
        if not layer.adapters:
            _replace_submodule(model, layer_name, layer.base_layer)
    for module_name, copies in list(saved_module_copies(model)):
        if name in copies.modules_to_save:
            del copies.modules_to_save[name]
        if not copies.modules_to_save:
            _replace_submodule(model, module_name, copies.original_module)
    detach_model_adapter(model, name)
    del book.configs[name]
    set_active_adapters(model, [n for n in book.active if n != name])


def merge_adapters(model: nn.Module, names: list[str] | None = None, *, safe: bool = False) -> None:
    """Fold adapters into the base weights (default: the active ones). ``safe`` checks for NaN/Inf first."""
    names = list(adapter_book(model).active) if names is None else names
    refuse_merge(model, names)
    _refuse_unmergeable_layers(model, names)
    for _, layer in wrapped_layers(model):
        layer.merge([n for n in names if n in layer.adapters], safe)


def _refuse_unmergeable_layers(model: nn.Module, names: list[str]) -> None:
    """Checked over every layer before any weight changes, so a refusal never leaves a half-merged model."""
    for layer_name, layer in wrapped_layers(model):
        for name in names:
            adapter = layer.adapters[name] if name in layer.adapters else None
            if adapter is not None and not adapter.mergeable:
                raise AdapterError(
                    f"adapter '{name}' ({type(adapter).__name__} on '{layer_name}') cannot be merged into the weights: "
                    "its output depends on the input (routing, inserted modules), not on a fixed weight change. "
                    "The base model is unchanged; keep it as an adapter (save_adapter) instead"
                )


def unmerge_adapters(model: nn.Module) -> None:
    for _, layer in wrapped_layers(model):
        layer.unmerge()


def merge_and_unload(model: nn.Module, names: list[str] | None = None, *, safe: bool = False) -> nn.Module:
    """Merge, then replace every wrapper by its plain base module: a normal transformers model again."""
    book = adapter_book(model)
    names = list(book.active) if names is None else names
    merge_adapters(model, names, safe=safe)
    for layer_name, layer in list(wrapped_layers(model)):
        _replace_submodule(model, layer_name, layer.base_layer)
    for module_name, copies in list(saved_module_copies(model)):
        _replace_submodule(model, module_name, copies.current())
        _untie_if_needed(model, module_name)
    for model_adapter_name, _ in list(model_adapters(model)):
        detach_model_adapter(model, model_adapter_name)  # inactive ones: unloading discards them, as layer adapters
    object.__setattr__(model, BOOK_ATTRIBUTE, AdapterBook())
    return model


def _untie_if_needed(model: nn.Module, module_name: str) -> None:
    """A trained copy of a tied LM head must stay untied when the model is saved and reloaded."""
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "tie_word_embeddings", False) and module_name.endswith("lm_head"):
        config.tie_word_embeddings = False


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; shared tensors counted once."""
    seen, trainable, total = set(), 0, 0
    for param in model.parameters():
        if id(param) in seen:
            continue
        seen.add(id(param))
        total += param.numel()
        trainable += param.numel() if param.requires_grad else 0
    return trainable, total


def adapter_parameters(model: nn.Module, name: str) -> dict[str, nn.Parameter]:
    """The structural truth of what belongs to adapter ``name`` (for saving and optimizers)."""
    params = {}
    for layer_name, layer in wrapped_layers(model):
        if name in layer.adapters:
            for pname, param in layer.adapters[name].named_parameters():
                params[f"{layer_name}.adapters.{name}.{pname}"] = param
    for module_name, copies in saved_module_copies(model):
        if name in copies.modules_to_save:
            for pname, param in copies.modules_to_save[name].named_parameters():
                params[f"{module_name}.modules_to_save.{name}.{pname}"] = param
    for adapter_name, model_adapter in model_adapters(model):
        if adapter_name == name:
            for pname, param in model_adapter.named_parameters():
                params[f"{CONTAINER_ATTRIBUTE}.adapters.{name}.{pname}"] = param
    return params
