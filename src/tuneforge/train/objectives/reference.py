"""The reference policy of DPO, IPO, KTO and GRPO, without a second model in memory.

- ``adapter_off``: the policy with its adapters disabled, i.e. the base model (a fresh adapter
  starts there, so this is the policy at step 0).
- ``init_adapter``: a frozen copy of the starting SFT adapter (``training.init_adapter``), held
  as a second adapter on the same layers and switched on for the reference forward only.

Either way the reference never changes during training, so its log-probs of a fixed example can be
computed once and cached (``training.cache_reference``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from tuneforge.adapters.model import disabled_adapters, set_active_adapters, set_trainable_adapter

REFERENCE_ADAPTER = "reference"

LogprobFn = Callable[[nn.Module, dict[str, torch.Tensor]], torch.Tensor]


class Reference:
    """Reference log-probs of a batch, computed by ``logprob_fn`` under the reference weights."""

    def __init__(self, kind: str, policy_adapter: str, cache: bool):
        self.kind = kind
        self.policy_adapter = policy_adapter
        self._cache: dict[int, torch.Tensor] | None = {} if cache else None

    def logprobs(self, model: nn.Module, batch: dict[str, torch.Tensor], logprob_fn: LogprobFn) -> torch.Tensor:
        """One value per row; rows are identified by ``batch['example_ids']`` for the cache."""
        ids = batch["example_ids"].tolist() if self._cache is not None else None
        if ids is not None and all(i in self._cache for i in ids):
            return torch.stack([self._cache[i] for i in ids]).to(batch["input_ids"].device)
        with torch.no_grad(), self._weights(model):
            values = logprob_fn(model, batch).detach()
        if ids is not None:
            self._cache.update((i, v.cpu()) for i, v in zip(ids, values))
        return values

    def uncached_logprobs(self, model: nn.Module, batch: dict[str, torch.Tensor], logprob_fn: LogprobFn) -> torch.Tensor:
        """For rows that change from batch to batch (KTO's mismatched pairs): never cached."""
        return self.run(model, batch, logprob_fn)

    def run(self, model: nn.Module, batch: dict[str, torch.Tensor], fn: LogprobFn) -> torch.Tensor:
        """``fn(model, batch)`` under the reference weights, without gradients and uncached."""
        with torch.no_grad(), self._weights(model):
            return fn(model, batch).detach()

    def _weights(self, model: nn.Module):
        if self.kind == "init_adapter":
            return _switched_adapter(model, REFERENCE_ADAPTER, self.policy_adapter)
        return disabled_adapters(model)


class _switched_adapter:
    """Run with adapter ``name`` active instead of ``back``, then switch back (even on error)."""

    def __init__(self, model: nn.Module, name: str, back: str):
        self.model, self.name, self.back = model, name, back

    def __enter__(self) -> None:
        set_active_adapters(self.model, [self.name])

    def __exit__(self, *exc) -> None:
        set_active_adapters(self.model, [self.back])


def start_from_init_adapter(model: nn.Module, training, policy_adapter: str) -> None:
    """``training.init_adapter``: the policy starts from the saved adapter's weights; with
    ``reference: init_adapter`` a frozen copy is added beside it (adapter weights only, no second model)."""
    if training.init_adapter is None:
        return
    from tuneforge.adapters.peft_format import load_adapter, load_adapter_weights

    load_adapter_weights(model, training.init_adapter, policy_adapter)
    if training.reference == "init_adapter":
        load_adapter(model, training.init_adapter, REFERENCE_ADAPTER, trainable=False, activate=False)
    set_trainable_adapter(model, policy_adapter)
    set_active_adapters(model, [policy_adapter])
