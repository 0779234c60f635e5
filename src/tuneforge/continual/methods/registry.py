"""Continual methods by name: ``method: {name: replay, fraction: 0.1}`` in a continual config."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from tuneforge.continual.methods.base import ContinualMethod, StreamContext
from tuneforge.errors import ConfigError


@dataclass(frozen=True)
class MethodEntry:
    name: str
    method_class: type[ContinualMethod]
    description: str


_REGISTRY: dict[str, MethodEntry] = {}


def register_continual_method(method_class: type[ContinualMethod], description: str) -> None:
    if method_class.name in _REGISTRY:
        raise ValueError(f"A continual method named {method_class.name!r} is already registered")
    _REGISTRY[method_class.name] = MethodEntry(method_class.name, method_class, description)


def continual_methods() -> dict[str, str]:
    return {name: _REGISTRY[name].description for name in sorted(_REGISTRY)}


def build_method(section: dict[str, Any], context: StreamContext) -> ContinualMethod:
    """The method named in ``method.name`` with its options validated (every problem named at once)."""
    options = dict(section)
    name = options.pop("name", None)
    if name not in _REGISTRY:
        raise ConfigError(f"method.name={name!r} is not a continual method; available: {', '.join(sorted(_REGISTRY))}")
    entry = _REGISTRY[name]
    try:
        parsed = entry.method_class.options_class(**options)
    except ValidationError as exc:
        problems = [f"  method.{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in exc.errors()]
        accepted = ", ".join(entry.method_class.options_class.model_fields) or "(none)"
        raise ConfigError(f"method {name!r} has {len(problems)} problem(s) (its options: {accepted}):\n"
                          + "\n".join(problems)) from None
    return entry.method_class(parsed, context)
