"""Per-example answer scores under a causal LM, computed in batches that are freed as they go.

For an example with prompt ids P and answer ids A (the final reply, tokenized on its own):

    conditioned sequence    P + A          scores A given the instruction
    unconditioned sequence  [start] + A    scores A alone (start: BOS, else EOS as a document boundary)

Both score exactly the same answer tokens, so their ratio (IFD) compares like with like. For each
scored sequence the model gives, averaged over the answer tokens a_t:

    nll  = -1/|A| sum_t log p(a_t | a_<t, context)              (perplexity = exp(nll))
    el2n =  1/|A| sum_t || softmax(logits_t) - onehot(a_t) ||_2   (EL2N per token, Paul et al. 2021)

Only the answer positions go through the LM head, one batch at a time; nothing but two floats per
example outlives a batch, so 100k examples never hold their activations at once.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from tuneforge.data import Example, Message, encode_prompt
from tuneforge.losses import backbone_and_head, hidden_states
from tuneforge.select.pool import response_text
from tuneforge.select.scoring.cache import ScoreCache, cache_key, sequences_digest

# A scored sequence: token ids (int32, 4 bytes a token rather than a Python int's ~36, so 100k
# tokenized examples fit in memory) and how many of the last ones are the answer.
Scored = tuple[np.ndarray, int]


@dataclass
class ScoringModel:
    model: torch.nn.Module
    tokenizer: object
    name: str
    template: str = "auto"
    batch_size: int = 16
    max_seq_len: int = 512
    cache: ScoreCache = field(default_factory=lambda: ScoreCache(None))
    use_cache: bool = True

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def fingerprint(self) -> str:
        first = next(self.model.parameters()).detach().flatten()[:4096].float().cpu().numpy()
        return cache_key(self.name, first.tobytes())

    # -- sequences ---------------------------------------------------------------------------
    def answer_ids(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def conditioned(self, prompt: Sequence[Message], answer: str) -> Scored:
        """The prompt rendered as training renders it, then the answer; the prompt is cut from the left if too long."""
        answer_ids = self.answer_ids(answer)[: self.max_seq_len - 1]
        prompt_ids = encode_prompt(list(prompt), self.tokenizer, self.template)
        room = max(1, self.max_seq_len - len(answer_ids))
        return np.array(prompt_ids[-room:] + answer_ids, dtype=np.int32), len(answer_ids)

    def unconditioned(self, answer: str) -> Scored:
        answer_ids = self.answer_ids(answer)[: self.max_seq_len - 1]
        return np.array([self.start_id()] + answer_ids, dtype=np.int32), len(answer_ids)

    def start_id(self) -> int:
        bos = getattr(self.tokenizer, "bos_token_id", None)
        return bos if bos is not None else self.tokenizer.eos_token_id

    def example_sequences(self, examples: Sequence[Example]) -> tuple[list[Scored], list[Scored]]:
        """(conditioned, unconditioned) sequences of each example's final reply."""
        conditioned, unconditioned = [], []
        for example in examples:
            answer = response_text(example)
            prompt = example.prompt_messages if example.is_chat else ()
            conditioned.append(self.conditioned(prompt, answer) if prompt else self.unconditioned(answer))
            unconditioned.append(self.unconditioned(answer))
        return conditioned, unconditioned

    # -- scores ------------------------------------------------------------------------------
    def answer_scores(self, sequences: list[Scored], kind: str = "answer") -> np.ndarray:
        """(n, 2) array: mean NLL and mean EL2N of each sequence's answer tokens (nan for an empty answer)."""
        compute = lambda: self._map_batches(sequences, _answer_nll_and_el2n, width=2)  # noqa: E731
        if not self.use_cache:
            return compute()
        key = cache_key(kind, self.fingerprint(), self.template, sequences_digest(sequences))
        return self.cache.get_or_compute(key, compute)

    def mean_hidden_states(self, sequences: list[Scored]) -> np.ndarray:
        """(n, H) array: the last layer's hidden states averaged over each whole sequence, L2-normalised."""
        compute = lambda: _normalise(self._map_batches(sequences, _mean_hidden, width=None))  # noqa: E731
        key = cache_key("hidden", self.fingerprint(), self.template, sequences_digest(sequences))
        return self.cache.get_or_compute(key, compute) if self.use_cache else compute()

    @torch.no_grad()
    def _map_batches(self, sequences: list[Scored], row_fn: Callable, width: int | None) -> np.ndarray:
        """Apply ``row_fn(hidden_row, head, ids, answer_len)`` to every sequence, batched by similar length."""
        _, head = backbone_and_head(self.model)
        order = sorted(range(len(sequences)), key=lambda i: len(sequences[i][0]))
        results: list[np.ndarray | None] = [None] * len(sequences)
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        was_training = self.model.training
        self.model.eval()
        try:
            for start in range(0, len(order), self.batch_size):
                chunk = order[start:start + self.batch_size]
                longest = max(len(sequences[i][0]) for i in chunk)
                input_ids = torch.full((len(chunk), longest), pad_id, dtype=torch.long)
                attention = torch.zeros((len(chunk), longest), dtype=torch.long)
                for row, index in enumerate(chunk):
                    ids = sequences[index][0]
                    input_ids[row, : len(ids)] = torch.from_numpy(ids.astype(np.int64))
                    attention[row, : len(ids)] = 1
                batch = {"input_ids": input_ids.to(self.device), "attention_mask": attention.to(self.device)}
                hidden = hidden_states(self.model, batch)  # (B, T, H)
                for row, index in enumerate(chunk):
                    ids, answer_len = sequences[index]
                    results[index] = row_fn(hidden[row, : len(ids)], head, ids, answer_len)
        finally:
            self.model.train(was_training)
        if width is None:
            return np.stack(results) if results else np.zeros((0, 0))
        return np.stack(results) if results else np.zeros((0, width))


def _answer_nll_and_el2n(hidden: torch.Tensor, head, ids: list[int], answer_len: int) -> np.ndarray:
    if answer_len == 0:
        return np.array([np.nan, np.nan])
    length = len(ids)
    positions = hidden[length - answer_len - 1: length - 1]  # (A, H): position t predicts token t + 1
    targets = torch.from_numpy(ids[length - answer_len:].astype(np.int64)).to(hidden.device)
    logits = head(positions).float()  # (A, V)
    nll = F.cross_entropy(logits, targets)
    probs = logits.softmax(-1)
    target_prob = probs.gather(1, targets[:, None]).squeeze(1)
    # ||p - e_y||^2 = sum p^2 - 2 p_y + 1
    el2n = (probs.pow(2).sum(-1) - 2 * target_prob + 1).clamp_min(0).sqrt().mean()
    return np.array([float(nll), float(el2n)])


def _mean_hidden(hidden: torch.Tensor, head, ids: list[int], answer_len: int) -> np.ndarray:
    return hidden.float().mean(0).cpu().numpy()


def _normalise(vectors: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.maximum(norms, 1e-12)


def load_scoring_model(name: str, *, device: str = "auto", dtype: str = "auto", template: str = "auto",
                       batch_size: int = 16, max_seq_len: int = 512, cache_dir: Path | None = None) -> ScoringModel:
    from tuneforge.models import load_model

    loaded = load_model(name, dtype=dtype, device=device)
    return ScoringModel(loaded.model, loaded.tokenizer, name, template, batch_size, max_seq_len, ScoreCache(cache_dir))
