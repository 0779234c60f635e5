"""`--budget`: a fraction of the pool (0.3) or a count of examples (300), checked before any model loads."""

from __future__ import annotations

from tuneforge.errors import ConfigError


def parse_budget(value: str | float | int | None) -> float | int | None:
    """'0.3' -> 0.3 (a fraction), '300' -> 300 (a count); None stays None (the strategy's own size)."""
    if value is None or isinstance(value, (int, float)) and not isinstance(value, bool):
        return value
    text = str(value).strip()
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        raise ConfigError(f"budget={value!r} is neither a fraction (e.g. 0.3) nor a count of examples (e.g. 300)") from None


def resolve_budget(budget: float | int | None, pool_size: int) -> int | None:
    """The number of examples to keep out of ``pool_size``; a fraction rounds to the nearest count (at least 1)."""
    if budget is None:
        return None
    if isinstance(budget, bool) or budget <= 0:
        raise ConfigError(f"budget={budget!r} keeps no example: give a fraction in (0, 1] (e.g. 0.3) or a count >= 1")
    if isinstance(budget, float) and budget <= 1:
        return max(1, round(budget * pool_size))
    if isinstance(budget, float) and not budget.is_integer():
        raise ConfigError(f"budget={budget!r} is a fraction above 1: give a fraction in (0, 1] or a whole count of examples")
    count = int(budget)
    if count > pool_size:
        raise ConfigError(f"budget={count} is larger than the data ({pool_size} examples): give at most {pool_size}, "
                          "or a fraction such as 0.3")
    return count
