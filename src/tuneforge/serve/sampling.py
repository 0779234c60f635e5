"""Choosing the next token of each row, and finding stop strings in generated text.

Every request carries its own `SamplingParams` and, when it samples, its own seeded
`torch.Generator`, so a request draws the same tokens whatever else shares its batch. Each row is
chosen on its own (`choose_token`), so a row whose logits are broken fails alone.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from tuneforge.errors import ConfigError, TuneforgeError

# Below this temperature a request is greedy. softmax(z / T) is already one-hot in float32 long
# before T reaches it for any realistic logit gap, and dividing by a far smaller T (1e-40) overflows
# to inf and turns the softmax into NaN. vLLM draws the same line (its _SAMPLING_EPS).
GREEDY_BELOW_TEMPERATURE = 1e-5


class NonFiniteLogitsError(TuneforgeError):
    """A row's logits hold NaN or infinity (broken weights, often an adapter's); only that row fails."""


@dataclass(frozen=True)
class SamplingParams:
    """How one request picks tokens and when it stops. temperature 0 (or below 1e-5) means greedy."""

    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0  # 0: no top-k cut
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)
    logprobs: bool = False
    ignore_eos: bool = False  # generate max_tokens whatever the model says (benchmarks)

    def __post_init__(self):
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        else:
            object.__setattr__(self, "stop", tuple(self.stop))
        problems = []
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            problems.append(f"max_tokens={self.max_tokens!r} must be a positive integer")
        if not math.isfinite(self.temperature) or self.temperature < 0:
            problems.append(f"temperature={self.temperature!r} must be >= 0 (0 means greedy)")
        if not (0 < self.top_p <= 1):
            problems.append(f"top_p={self.top_p!r} must be in (0, 1]")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            problems.append(f"top_k={self.top_k!r} must be an integer >= 0 (0 turns it off)")
        if any(not isinstance(s, str) or not s for s in self.stop):
            problems.append(f"stop={list(self.stop)!r} must hold non-empty strings")
        if problems:
            raise ConfigError("; ".join(problems))

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW_TEMPERATURE

    def make_generator(self, device: torch.device) -> torch.Generator | None:
        if self.greedy:
            return None
        generator = torch.Generator(device=device)
        if self.seed is None:
            generator.seed()
        else:
            generator.manual_seed(self.seed)
        return generator


def filtered_probabilities(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The distribution one row samples from: logits (V,) -> probabilities (V,) after temperature,
    top-k (keep the k largest) and top-p (keep the smallest set of top tokens whose mass reaches p)."""
    logits = logits.float()
    scaled = (logits - logits.max()) / params.temperature  # the top logit becomes 0: no overflow to inf
    if 0 < params.top_k < scaled.shape[-1]:
        kth = torch.topk(scaled, params.top_k).values[-1]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    probs = torch.softmax(scaled, dim=-1)
    if params.top_p < 1:
        sorted_probs, order = torch.sort(probs, descending=True)
        mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
        keep_sorted = mass_before < params.top_p  # the top token always stays
        keep = torch.zeros_like(keep_sorted).scatter(0, order, keep_sorted)
        probs = torch.where(keep, probs, torch.zeros_like(probs))
        probs = probs / probs.sum()
    return probs


def choose_token(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None,
                 log_probs: torch.Tensor | None = None) -> tuple[int, float | None]:
    """The next token for one row's logits (V,), with its log-probability under the model when the
    request asked for logprobs (`log_probs` (V,): the raw distribution, before temperature or truncation).
    Raises NonFiniteLogitsError when the logits hold NaN or infinity."""
    if not bool(torch.isfinite(logits).all()):
        raise NonFiniteLogitsError("the model produced non-finite logits (NaN or infinity) for this request")
    if params.greedy:
        token = int(logits.argmax())
    else:
        probs = filtered_probabilities(logits, params)
        token = int(torch.multinomial(probs, 1, generator=generator).item())
    if not params.logprobs:
        return token, None
    if log_probs is None:
        log_probs = torch.log_softmax(logits.float(), dim=-1)
    return token, float(log_probs[token])


def find_stop(text: str, stops: Sequence[str]) -> int | None:
    """Where the earliest stop string starts in `text`, or None."""
    found = [at for s in stops if (at := text.find(s)) >= 0]
    return min(found) if found else None


def streamable_length(text: str, stops: Sequence[str]) -> int:
    """How much of `text` can be sent now: hold back an unfinished UTF-8 character (decoded as
    U+FFFD) and any tail that may still grow into a stop string."""
    end = len(text)
    while end and text[end - 1] == "\ufffd":
        end -= 1
    held = 0
    for stop in stops:
        for size in range(min(len(stop) - 1, end), held, -1):
            if text[end - size:end] == stop[:size]:
                held = size
                break
    return end - held
