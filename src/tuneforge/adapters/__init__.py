"""Adapter core: targeting, the layer wrapper, the method registry, and PEFT-format files."""

from tuneforge.adapters.config import AdapterConfig, LoraConfig
from tuneforge.adapters.layer import AdaptedLayer, LayerAdapter
from tuneforge.adapters.model import (
    adapter_names,
    adapter_parameters,
    add_adapter,
    delete_adapter,
    disabled_adapters,
    merge_adapters,
    merge_and_unload,
    set_active_adapters,
    set_trainable_adapter,
    trainable_parameters,
    unmerge_adapters,
)
from tuneforge.adapters.optim import loraplus_param_groups
from tuneforge.adapters.peft_format import load_adapter, read_adapter_config, save_adapter
from tuneforge.adapters.registry import MethodSpec, get_method, list_methods, register_method

__all__ = [
    "AdaptedLayer", "AdapterConfig", "LayerAdapter", "LoraConfig", "MethodSpec",
    "adapter_names", "adapter_parameters", "add_adapter", "delete_adapter", "disabled_adapters",
    "get_method", "list_methods", "load_adapter", "loraplus_param_groups", "merge_adapters",
    "merge_and_unload", "read_adapter_config", "register_method", "save_adapter",
    "set_active_adapters", "set_trainable_adapter", "trainable_parameters", "unmerge_adapters",
]


def __getattr__(name: str):
    """Every method's config class by its name (``from tuneforge.adapters import VeraConfig``), found
    through the registry so that this file does not list each method."""
    if name.endswith("Config"):
        for spec in list_methods():
            if spec.config_class.__name__ == name:
                return spec.config_class
    raise AttributeError(f"module 'tuneforge.adapters' has no attribute {name!r}")
