"""GRPO's sampler: G completions per prompt from the policy being trained, through tuneforge's own
serving engine (serve/engine.py: continuous batching, every row the policy adapter).

The engine runs on the training model itself, so it reads the adapter's live weights: its per-row
LoRA stacks watch the trainable factors' version counters, and an optimizer step (an in-place update)
makes them restack at the next call. Sampling runs under no_grad in eval mode (no dropout) and the
model goes back to train mode afterwards, even on error. Sampling runs in the weights' own dtype
(autocast off) and eagerly where the decoder layers are compiled (their shapes change every step).

Fallback: transformers' ``generate`` on the same model, used when the engine cannot run this policy.
That is when the architecture is not one the engine supports, or when the policy adapter cannot be
applied per row: model-level adapters other than virtual prompts, input-scaling adapters (IA3 on
feed-forward layers, OFT), ``modules_to_save``. The reason is logged once, when the first batch is
sampled; ``PolicySampler.backend`` names the one in use.

Each sampled row draws its seed from torch's global generator, so a run's samples follow
``training.seed`` and do not depend on which rows share a batch.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from torch import nn

from tuneforge.errors import ConfigError
from tuneforge.eval.generation import left_pad, padding_id, stop_token_ids, until_stop
from tuneforge.train.compile import eager_only

logger = logging.getLogger(__name__)

ENGINE, GENERATE = "engine", "generate"
MAX_SEED = 2**62
LENGTH_ROUNDING = 64  # the engine's KV slots are sized for the longest request seen, rounded up to this


class PolicySampler:
    """Completions of the current policy: each is its generated token ids, ending with the stop
    token when one ended it (the stop token is trained too: it ends the answer)."""

    def __init__(self, tokenizer, policy_adapter: str, template: str, max_new_tokens: int, temperature: float):
        self.tokenizer = tokenizer
        self.policy_adapter = policy_adapter
        self.template = template
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.backend: str | None = None  # decided on the first call
        self._engine = None

    @torch.no_grad()
    def sample(self, model: nn.Module, prompts: Sequence[Sequence[int]], copies: int, greedy: bool) -> list[list[int]]:
        """``copies`` completions of each prompt, consecutive: [p0, p0, .., p1, p1, ..]."""
        rows = [list(p) for p in prompts for _ in range(copies)]
        was_training = model.training
        model.eval()
        try:
            # The weights' own precision; compiled layers (training.compile) run eagerly: shapes change every step.
            with torch.autocast(next(model.parameters()).device.type, enabled=False), eager_only():
                engine = self._engine_for(model, rows)
                if engine is None:
                    return self._generate(model, rows, greedy)
                return self._engine_sample(engine, rows, greedy)
        finally:
            model.train(was_training)

    # ---- the serving engine ----------------------------------------------------------------------

    def _engine_for(self, model: nn.Module, rows: list[list[int]]):
        """The engine for this model, sized for ``rows`` (rebuilt only when they need more room);
        None where the engine cannot run this policy (then transformers' generate samples)."""
        if self.backend == GENERATE:
            return None
        needed_length = max(len(r) for r in rows) + self.max_new_tokens
        engine = self._engine
        if engine is not None and engine.model is model and engine.max_model_len >= needed_length \
                and engine.scheduler.max_batch_size >= len(rows):
            return engine
        reason = self._engine_problem(model)
        if reason is None:
            from tuneforge.serve.engine import Engine

            length = -(-needed_length // LENGTH_ROUNDING) * LENGTH_ROUNDING
            try:
                engine = Engine(model, self.tokenizer, max_batch_size=len(rows), max_queue=max(64, len(rows)),
                                max_model_len=length, template=self.template)
            except ConfigError as error:
                reason = str(error)
        if reason is not None:
            logger.warning("GRPO samples with transformers' generate, not tuneforge's serving engine: %s", reason)
            self.backend, self._engine = GENERATE, None
            return None
        if self.backend is None:
            logger.info("GRPO samples with tuneforge's serving engine (continuous batching, the live policy adapter)")
        self.backend, self._engine = ENGINE, engine
        return engine

    def _engine_problem(self, model: nn.Module) -> str | None:
        from tuneforge.adapters.model import adapter_names
        from tuneforge.serve.adapters import per_row_problem

        if self.policy_adapter not in adapter_names(model):
            return f"the policy has no adapter named '{self.policy_adapter}'"
        return per_row_problem(model, self.policy_adapter)

    def _engine_sample(self, engine, rows: list[list[int]], greedy: bool) -> list[list[int]]:
        from tuneforge.serve.engine import GenerationRequest
        from tuneforge.serve.sampling import SamplingParams

        requests = []
        for row in rows:
            seed = None if greedy else int(torch.randint(MAX_SEED, (1,)))
            params = SamplingParams(max_tokens=self.max_new_tokens, temperature=0.0 if greedy else self.temperature,
                                    seed=seed)
            requests.append(GenerationRequest(tuple(row), params, adapter=self.policy_adapter))
        completions = engine.generate(requests)
        return [list(c.token_ids) + ([c.stop_token_id] if c.stop_token_id is not None else []) for c in completions]

    # ---- the fallback: transformers' generate ------------------------------------------------------

    def _generate(self, model: nn.Module, rows: list[list[int]], greedy: bool) -> list[list[int]]:
        stop_ids = stop_token_ids(model, self.tokenizer)
        pad_id = padding_id(model, self.tokenizer, stop_ids)
        input_ids, attention_mask = left_pad(rows, pad_id)
        device = next(model.parameters()).device
        sampling = dict(do_sample=False, temperature=None) if greedy else dict(do_sample=True, temperature=self.temperature)
        output = model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                                max_new_tokens=self.max_new_tokens, pad_token_id=pad_id, eos_token_id=list(stop_ids),
                                top_p=None, top_k=None, **sampling)
        completions = []
        for ids in output[:, input_ids.shape[1]:].tolist():
            kept = until_stop(ids, stop_ids)
            completions.append(kept + ids[len(kept):len(kept) + 1])
        return completions
