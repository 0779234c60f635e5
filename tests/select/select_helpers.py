"""Shared builders for the selection tests: tiny pools and a scorer around a tiny chat model."""

from __future__ import annotations

from tiny_models import tiny_chat_model_and_tokenizer

from tuneforge.data.records import chat_example
from tuneforge.select import Pool, SelectContext
from tuneforge.select.scoring.model import ScoringModel


def qa_pool(pairs: list[tuple[str, str]]) -> Pool:
    return Pool([chat_example([("user", q), ("assistant", a)]) for q, a in pairs])


def tiny_scorer(batch_size: int = 4, model_and_tokenizer=None, **kwargs) -> ScoringModel:
    model, tokenizer = model_and_tokenizer or tiny_chat_model_and_tokenizer()
    return ScoringModel(model, tokenizer, "tiny", template="chatml", batch_size=batch_size, max_seq_len=128, **kwargs)


def context_with(scorer: ScoringModel | None = None, seed: int = 0) -> SelectContext:
    def refuse():
        raise AssertionError("this selection must not load a model")

    return SelectContext(seed=seed, load_scorer=(lambda: scorer) if scorer is not None else refuse)
