"""The method registry: a new PEFT method is one module plus one ``register_method`` call.

Two kinds of methods plug in:
- **layer** methods wrap target modules in ``AdaptedLayer`` and provide a ``build`` factory that
  returns one ``LayerAdapter`` for one base layer (LoRA, DoRA, IA3, bottleneck adapters, ...);
- **model** methods change the model's inputs or cache rather than a layer (prompt/prefix tuning,
  hidden-state interventions) and provide an ``attach`` factory instead: (model, config, adapter name,
  **options) -> ``ModelAdapter``, whose ``detach()`` undoes it (see model_level.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from torch import nn

from tuneforge.adapters.config import AdapterConfig
from tuneforge.errors import ConfigError


@dataclass(frozen=True)
class MethodSpec:
    name: str
    config_class: type[AdapterConfig]
    supported_layers: Callable[[], tuple[type[nn.Module], ...]] = tuple
    build: Callable[[nn.Module, AdapterConfig, str], nn.Module] | None = None
    # Model-level methods only (see model_level.py): (model, config, adapter name, **options) -> ModelAdapter.
    attach: Callable[..., nn.Module] | None = None
    # Optional training-time hooks (see hooks.py): (model, adapter name, config) -> TrainingHooks | None.
    hooks: Callable[[nn.Module, str, AdapterConfig], object] | None = None
    description: str = ""
    aliases: tuple[str, ...] = field(default_factory=tuple)


_METHODS: dict[str, MethodSpec] = {}


def register_method(spec: MethodSpec) -> MethodSpec:
    for key in (spec.name, *spec.aliases):
        if key in _METHODS and _METHODS[key] is not spec:
            raise ValueError(f"adapter method '{key}' is already registered")
        _METHODS[key] = spec
    return spec


def get_method(name: str) -> MethodSpec:
    _ensure_builtin_methods()
    if name not in _METHODS:
        import difflib

        close = difflib.get_close_matches(name, list(_METHODS), n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"unknown adapter method '{name}'. Available: {', '.join(sorted(_METHODS))}.{hint}")
    return _METHODS[name]


def list_methods() -> list[MethodSpec]:
    _ensure_builtin_methods()
    return list(dict.fromkeys(_METHODS.values()))


def method_for_peft_type(peft_type: str) -> MethodSpec | None:
    _ensure_builtin_methods()
    return next((spec for spec in _METHODS.values() if spec.config_class.peft_type == peft_type), None)


def _ensure_builtin_methods() -> None:
    # Importing the package's method modules registers them; done lazily to avoid import cycles.
    import tuneforge.adapters.methods  # noqa: F401
