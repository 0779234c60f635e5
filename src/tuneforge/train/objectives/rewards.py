"""GRPO reward functions: verifiable rewards computed from a completion and the gold answer.

A reward function takes (completions, answers), two lists of strings, and returns one float per
completion. Built in: ``exact_match`` (the checker of the bundled tasks, eval/generation.py),
``contains`` (the gold answer as a whole word or number anywhere in the reply) and ``numeric`` (the
reply's last number equals the gold number). A user's function is named by import path,
``package.module:function``.
"""

from __future__ import annotations

import importlib
import math
import re
from collections.abc import Callable, Sequence

from tuneforge.errors import ConfigError
from tuneforge.eval.generation import contains, exact_match

RewardFn = Callable[[Sequence[str], Sequence[str]], Sequence[float]]


def exact_match_reward(completions: Sequence[str], answers: Sequence[str]) -> list[float]:
    return [1.0 if exact_match(c, a) else 0.0 for c, a in zip(completions, answers)]


def contains_reward(completions: Sequence[str], answers: Sequence[str]) -> list[float]:
    """1 when the gold answer appears in the completion as a whole word or number (eval's ``contains``)."""
    return [1.0 if contains(c, a) else 0.0 for c, a in zip(completions, answers)]


NUMBER = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?")


def numeric_reward(completions: Sequence[str], answers: Sequence[str]) -> list[float]:
    """1 when the completion's last number equals the gold number ("... so 1,000." == "1000"); a
    gold answer that is not a number raises, so those samples count as reward failures."""
    rewards = []
    for completion, answer in zip(completions, answers):
        gold = float(answer.strip().replace(",", ""))
        found = NUMBER.findall(completion)
        rewards.append(1.0 if found and float(found[-1].replace(",", "")) == gold else 0.0)
    return rewards


BUILTIN_REWARDS: dict[str, RewardFn] = {"exact_match": exact_match_reward, "contains": contains_reward,
                                        "numeric": numeric_reward}


def resolve_reward(name: str) -> RewardFn:
    if name in BUILTIN_REWARDS:
        return BUILTIN_REWARDS[name]
    module_name, _, attribute = name.partition(":")
    if not module_name or not attribute:
        raise ConfigError(f"training.grpo_reward={name!r} is neither a built-in reward ({', '.join(BUILTIN_REWARDS)}) "
                          "nor an import path like my_rewards:score")
    try:
        function = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"training.grpo_reward={name!r} could not be imported ({exc}); check the module is on "
                          "PYTHONPATH and defines that function") from None
    if not callable(function):
        raise ConfigError(f"training.grpo_reward={name!r} is not callable")
    return function


def safe_rewards(reward_fn: RewardFn, completions: Sequence[str], answers: Sequence[str]) -> tuple[list[float | None], int]:
    """(one reward or None per completion, how many failed). A function that raises is retried one
    completion at a time, so one bad sample does not cost the batch; NaN/inf and non-numbers fail."""
    try:
        values = list(reward_fn(completions, answers))
        if len(values) != len(completions):
            raise ValueError(f"returned {len(values)} rewards for {len(completions)} completions")
    except Exception:  # noqa: BLE001  (a user's function may raise anything; each sample is retried)
        values = []
        for completion, answer in zip(completions, answers):
            try:
                values.extend(list(reward_fn([completion], [answer]))[:1] or [None])
            except Exception:  # noqa: BLE001
                values.append(None)
    rewards = [float(v) if isinstance(v, (int, float)) and math.isfinite(float(v)) else None for v in values]
    return rewards, sum(r is None for r in rewards)
