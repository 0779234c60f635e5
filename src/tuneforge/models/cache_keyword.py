"""The attention cache's keyword: ``past_key_values`` until transformers 5.24, ``cache`` from 5.25.

transformers 5.25 renamed the argument (and the output field) and maps the old name to the new one
with a deprecation warning, but when a caller passes both it keeps ``cache`` and drops
``past_key_values``: code that adds a cache under the old name next to generate's new one loses it
silently. Everything in tuneforge that reads or writes the cache goes through these helpers.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

from torch import nn

NEW = "cache"
OLD = "past_key_values"


@functools.lru_cache(maxsize=None)
def _accepts_new_keyword(forward_type: type) -> bool:
    try:
        return NEW in inspect.signature(forward_type.forward).parameters
    except (TypeError, ValueError):
        return False


def cache_keyword(module: nn.Module) -> str:
    """The name under which ``module.forward`` takes the attention cache."""
    return NEW if _accepts_new_keyword(type(module)) else OLD


def get_cache(inputs: dict[str, Any]) -> Any:
    """The cache a caller passed, under either name (None when it passed none)."""
    cache = inputs.get(NEW)
    return cache if cache is not None else inputs.get(OLD)


def set_cache(inputs: dict[str, Any], module: nn.Module, cache: Any) -> None:
    """Put ``cache`` under the one name ``module`` reads, removing the other so it cannot win."""
    keyword = cache_keyword(module)
    inputs.pop(OLD if keyword == NEW else NEW, None)
    inputs[keyword] = cache


def clear_output_cache(output: Any) -> None:
    """Drop the cache from a model output, whichever field name this transformers uses."""
    for name in (NEW, OLD):
        if hasattr(output, name):
            try:
                setattr(output, name, None)
            except AttributeError:  # a read-only alias of the other field
                pass
