"""Which modules of a model an adapter wraps: names, suffixes, regexes, ``all-linear``, layer indices.

Matching follows PEFT's semantics so that ``adapter_config.json`` files mean the same thing in both
tools: a list entry matches a module whose name equals it or ends with ``.entry``; a single string
is a regex that must match the whole name.
"""

from __future__ import annotations

import difflib
import re
from collections import Counter
from collections.abc import Iterable

from torch import nn

from tuneforge.adapters.config import AdapterConfig, TargetSpec
from tuneforge.adapters.layer import AdaptedLayer
from tuneforge.adapters.saved_modules import SavedModuleCopies
from tuneforge.errors import AdapterError
from tuneforge.quant.linear import QuantLinear

ALL_LINEAR = "all-linear"
ALL_NORMS = "all-norms"
DEFAULT_LAYER_PATTERNS = ("layers", "h", "blocks", "layer", "block")


def linear_layer_types() -> tuple[type[nn.Module], ...]:
    """Linear layers: nn.Linear, 4/8-bit ``QuantLinear``, and GPT-2's transposed ``Conv1D`` when
    transformers is installed."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # model-agnostic core: transformers is optional here
        return (nn.Linear, QuantLinear)
    return (nn.Linear, Conv1D, QuantLinear)


def is_norm_layer(module: nn.Module) -> bool:
    """LayerNorm, RMSNorm and model-specific norms (transformers' ``LlamaRMSNorm``, ...), by class name."""
    return type(module).__name__.endswith("Norm")


def name_matches(spec: TargetSpec, name: str) -> bool:
    if spec is None:
        return False
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(name == entry or name.endswith("." + entry) for entry in spec)


def layer_index(name: str, patterns: Iterable[str]) -> int | None:
    for pattern in patterns:
        found = re.search(rf"(?:^|\.){re.escape(pattern)}\.(\d+)(?:\.|$)", name)
        if found:
            return int(found.group(1))
    return None


def peft_would_target(name: str, peft_config: dict) -> bool:
    """Whether peft adapts module ``name`` under ``peft_config`` (adapter_config.json's fields, with a
    list ``target_modules``), by the rules of peft 0.21's ``check_target_module_exists``.

    exclude_modules and modules_to_save win. An entry equal to the name selects it, whatever the layer
    fields say; an entry the name ends with (``.entry``) selects it when its layer index is in
    layers_to_transform. peft's layer index is the number after the first ``layers_pattern`` segment,
    or, with no pattern, after the first dotted segment followed by a number (tuneforge's own rule,
    ``layer_index``, looks for known names instead, so the two can disagree).
    """
    if name_matches(peft_config.get("exclude_modules"), name):
        return False
    if any(re.match(rf"(^|.*\.){kept}($|\..*)", name) for kept in peft_config.get("modules_to_save") or []):
        return False
    targets = peft_config["target_modules"]
    if name in targets:
        return True
    if not any(name.endswith("." + entry) for entry in targets):
        return False
    layers = peft_config.get("layers_to_transform")
    if layers is None or layers == []:
        return True
    index = _peft_layer_index(name, _as_list(peft_config.get("layers_pattern")))
    return index is not None and index in ([layers] if isinstance(layers, int) else layers)


def _peft_layer_index(name: str, patterns: list[str]) -> int | None:
    if not any(patterns):
        found = re.match(r".*?\.[^.]*\.(\d+)\.", name)
        return int(found.group(1)) if found else None
    for pattern in patterns:  # peft reads each pattern as a regex
        found = re.match(rf"(?:^|.*?\.){pattern}\.(\d+)\.", name)
        if found:
            return int(found.group(1))
    return None


def candidate_modules(model: nn.Module) -> Iterable[tuple[str, nn.Module]]:
    """Named modules, skipping what lives inside an adapter wrapper (its base layer, its adapters)."""
    inside: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(prefix + ".") for prefix in inside):
            continue
        if isinstance(module, (AdaptedLayer, SavedModuleCopies)):
            inside.append(name)
        if name:
            yield name, module


def output_head_names(model: nn.Module) -> set[str]:
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    return {name for name, module in model.named_modules() if head is not None and module is head} | {
        name for name, _ in model.named_modules() if name.split(".")[-1] in ("lm_head", "score", "classifier")
    }


def select_targets(model: nn.Module, config: AdapterConfig, supported: tuple[type[nn.Module], ...]) -> list[str]:
    """Names of the modules ``config`` targets; an error that lists what exists when nothing matches."""
    if config.target_modules is None:
        raise AdapterError(
            f"{config.method}: target_modules is not set. Give module names (e.g. ['q_proj', 'v_proj']), "
            f"a regex, or '{ALL_LINEAR}'. Modules in this model: {_module_summary(model)}"
        )
    heads = output_head_names(model)
    patterns = _as_list(config.layers_pattern) or DEFAULT_LAYER_PATTERNS
    selected = []
    for name, module in candidate_modules(model):
        base = module.base_layer if isinstance(module, AdaptedLayer) else module
        if config.target_modules == ALL_LINEAR:
            hit = isinstance(base, linear_layer_types()) and name not in heads
        elif config.target_modules == ALL_NORMS:
            hit = is_norm_layer(base)
        else:
            hit = name_matches(config.target_modules, name)
        if not hit or name_matches(config.exclude_modules, name):
            continue
        if config.layers_to_transform is not None and layer_index(name, patterns) not in config.layers_to_transform:
            continue
        if not isinstance(base, supported):
            kinds = ", ".join(t.__name__ for t in supported)
            raise AdapterError(
                f"{config.method}: target '{name}' is a {type(base).__name__}; this method wraps {kinds}. "
                f"Target its sub-layers instead, e.g. {_example_children(base, name, supported)}."
            )
        selected.append(name)
    if not selected:
        raise AdapterError(_no_match_message(model, config))
    return selected


def _as_list(value) -> list[str]:
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)


def _leaf_counts(model: nn.Module) -> Counter:
    return Counter(name.split(".")[-1] for name, module in candidate_modules(model) if isinstance(module, linear_layer_types() + (nn.Embedding,)))


def _module_summary(model: nn.Module, limit: int = 12) -> str:
    counts = _leaf_counts(model)
    return ", ".join(f"{leaf} ({n})" for leaf, n in counts.most_common(limit)) or "(no Linear or Embedding layers)"


def _example_children(module: nn.Module, name: str, supported) -> str:
    children = [f"{name}.{n}" for n, m in module.named_modules() if n and isinstance(m, supported)]
    return ", ".join(children[:3]) or "(it has no such sub-layers)"


def _no_match_message(model: nn.Module, config: AdapterConfig) -> str:
    wanted = config.target_modules
    message = f"{config.method}: target_modules={wanted!r} matched no module of {type(model).__name__}"
    if config.layers_to_transform is not None:
        message += f" in layers {config.layers_to_transform}"
    if config.exclude_modules:
        message += f" (after exclude_modules={config.exclude_modules!r})"
    hints = []
    if isinstance(wanted, list):
        leaves = list(_leaf_counts(model))
        for entry in wanted:
            close = difflib.get_close_matches(entry.split(".")[-1], leaves, n=1)
            if close:
                hints.append(f"'{entry}' -> did you mean '{close[0]}'?")
    message += ". " + " ".join(hints) if hints else "."
    return message + f" Linear/Embedding modules in this model: {_module_summary(model)}."
