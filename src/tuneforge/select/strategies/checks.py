"""Data checks shared by strategies, run before any model loads."""

from __future__ import annotations

from tuneforge.errors import ConfigError, DataError
from tuneforge.select.pool import Pool, instruction_text


def require_instructions(pool: Pool, strategy: str) -> None:
    """Strategies that compare an answer with and without its instruction need chat examples with a prompt."""
    missing = [e for e in pool.examples if not e.is_chat or not instruction_text(e).strip()]
    if missing:
        first = missing[0]
        raise DataError(f"strategy={strategy} scores each reply with and without its instruction, but {len(missing)} of "
                        f"{len(pool)} examples have no instruction (first: {first.origin}). Use chat, alpaca or "
                        "prompt/completion records, or another strategy (length, perplexity, dedup).")


def require_choice(options: dict, key: str, allowed: tuple[str, ...], strategy: str) -> None:
    if options[key] not in allowed:
        raise ConfigError(f"strategy={strategy}: option {key}={options[key]!r} is not one of {list(allowed)}")


def require_positive_int(options: dict, key: str, strategy: str, minimum: int = 1) -> None:
    value = options[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"strategy={strategy}: option {key}={value!r} must be a whole number >= {minimum}")
