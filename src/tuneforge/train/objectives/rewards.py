"""GRPO reward functions: verifiable rewards computed from a completion and the gold answer.

A reward function takes (completions, answers), two lists of strings, and returns one float per
completion. Built in: ``exact_match`` (the checker of the bundled tasks, eval/generation.py),
``contains`` (the gold answer as a whole word or number anywhere in the reply), ``numeric`` (the
reply's last number equals the gold number), ``regex:PATTERN`` (the pattern's first group, or its whole
match, at its first match in the reply equals the gold answer under exact match's normalisation) and
``format:PATTERN`` (the whole stripped reply matches the pattern, whatever the answer: the format reward
of DeepSeek-R1-style recipes). A user's function is named by import path, ``package.module:function``.
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


def regex_reward(pattern: re.Pattern) -> RewardFn:
    def extracted_answer_matches(completions: Sequence[str], answers: Sequence[str]) -> list[float]:
        rewards = []
        for completion, answer in zip(completions, answers):
            found = pattern.search(completion)
            extracted = (found.group(1) if pattern.groups else found.group(0)) if found else None
            rewards.append(1.0 if extracted is not None and exact_match(extracted, answer) else 0.0)
        return rewards
    return extracted_answer_matches


def format_reward(pattern: re.Pattern) -> RewardFn:
    def follows_format(completions: Sequence[str], answers: Sequence[str]) -> list[float]:
        return [1.0 if pattern.fullmatch(completion.strip()) else 0.0 for completion in completions]
    return follows_format


PATTERN_REWARDS = {"regex": regex_reward, "format": format_reward}


def _pattern_reward(name: str) -> RewardFn | None:
    kind, separator, pattern = name.partition(":")
    if not separator or kind not in PATTERN_REWARDS:
        return None
    try:
        compiled = re.compile(pattern, re.DOTALL)
    except re.error as exc:
        raise ConfigError(f"training.grpo_reward={name!r}: the pattern does not compile ({exc}); write a Python "
                          "regular expression after '" + kind + ":'") from None
    return PATTERN_REWARDS[kind](compiled)


BUILTIN_REWARDS: dict[str, RewardFn] = {"exact_match": exact_match_reward, "contains": contains_reward,
                                        "numeric": numeric_reward}


def resolve_reward(name: str) -> RewardFn:
    if name in BUILTIN_REWARDS:
        return BUILTIN_REWARDS[name]
    pattern_reward = _pattern_reward(name)
    if pattern_reward is not None:
        return pattern_reward
    module_name, _, attribute = name.partition(":")
    if not module_name or not attribute:
        raise ConfigError(f"training.grpo_reward={name!r} is neither a built-in reward ({', '.join(BUILTIN_REWARDS)}, "
                          "regex:PATTERN, format:PATTERN) nor an import path like my_rewards:score")
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
