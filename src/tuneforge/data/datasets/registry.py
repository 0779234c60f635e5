"""Bundled datasets by name: `get_dataset("arithmetic", split="eval")`, `list_datasets()`.

A dataset is a builder function `builder(split, **options) -> list[Example]`; its keyword
parameters are its options, so the signature is the schema and unknown options are reported with
the accepted ones and their defaults.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass

from tuneforge.data.records import Example
from tuneforge.errors import ConfigError

SPLITS = ("train", "eval")


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    builder: Callable[..., list[Example]]
    description: str

    def options(self) -> dict[str, object]:
        """Option name -> default, read from the builder's keyword parameters."""
        parameters = inspect.signature(self.builder).parameters.values()
        return {p.name: p.default for p in parameters if p.name != "split"}


_REGISTRY: dict[str, DatasetSpec] = {}


def register_dataset(name: str, builder: Callable[..., list[Example]], description: str) -> None:
    if name in _REGISTRY:
        raise ValueError(f"A bundled dataset named {name!r} is already registered")
    _REGISTRY[name] = DatasetSpec(name, builder, description)


def dataset_names() -> list[str]:
    return sorted(_REGISTRY)


def list_datasets() -> dict[str, str]:
    """Bundled dataset name -> one-line description."""
    return {name: _REGISTRY[name].description for name in dataset_names()}


def get_dataset(name: str, split: str = "train", **options) -> list[Example]:
    """The examples of one split of a bundled dataset; deterministic for given options."""
    if name not in _REGISTRY:
        raise ConfigError(f"Unknown bundled dataset {name!r}; available: {', '.join(dataset_names())}")
    spec = _REGISTRY[name]
    if split not in SPLITS:
        raise ConfigError(f"split={split!r} for dataset {name!r} is not one of {list(SPLITS)}")
    accepted = spec.options()
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        described = ", ".join(f"{key}={default!r}" for key, default in accepted.items())
        raise ConfigError(f"Dataset {name!r} has no option(s) {unknown}; its options (with defaults) are: {described}")
    return spec.builder(split=split, **options)
