"""The objective protocol, the SFT objective, and the preference objectives built on loss modules."""

from __future__ import annotations

import math
from typing import Protocol

import torch
from torch import nn

from tuneforge.eval.loss import evaluate_loss
from tuneforge.losses import token_loss_sum
from tuneforge.models.precision import autocast
from tuneforge.train.objectives.dpo import chosen_nll, dpo_loss
from tuneforge.train.objectives.ipo import ipo_loss
from tuneforge.train.objectives.kto import kl_reference_point, kto_loss
from tuneforge.train.objectives.logprobs import (label_mask, labelled_hidden_states, logprobs_from_hidden, pair_logprobs,
                                                 per_answer_sums, sequence_logprobs, token_kl)
from tuneforge.train.objectives.orpo import orpo_loss
from tuneforge.train.objectives.reference import Reference
from tuneforge.train.objectives.simpo import simpo_loss

OBJECTIVES = ("sft", "dpo", "ipo", "kto", "orpo", "simpo", "grpo")
PAIRWISE = ("dpo", "ipo", "orpo", "simpo")  # trained on {prompt, chosen, rejected}


def needs_reference(objective: str) -> bool:
    return objective in ("dpo", "ipo", "kto", "grpo")


class Objective(Protocol):
    name: str

    def units(self, batch: dict[str, torch.Tensor]) -> int: ...

    def loss_sum(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]: ...

    def evaluate(self, model: nn.Module, batches: list[dict[str, torch.Tensor]], device: torch.device) -> tuple[float, dict[str, float]]: ...


class SupervisedObjective:
    """Next-token cross-entropy on labelled tokens, averaged over the step's labelled tokens."""

    name = "sft"

    def __init__(self, training):
        self.training = training

    def units(self, batch):
        return int(label_mask(batch).sum())

    def loss_sum(self, model, batch):
        loss, _ = token_loss_sum(model, batch, self.training.loss_chunk_size)
        return loss, {}

    def evaluate(self, model, batches, device):
        return evaluate_loss(model, batches, self.training.precision, self.training.loss_chunk_size, device), {}


class PairwiseObjective:
    """DPO, IPO, ORPO and SimPO: rows [chosen_1..chosen_P, rejected_1..rejected_P]; averaged over pairs.

    Metrics (means over pairs): the implicit rewards of chosen and rejected answers, their margin,
    and the preference accuracy (how often chosen's reward is the larger); on held-out pairs also the
    KL of the policy from its reference (DPO, IPO)."""

    def __init__(self, name: str, training, reference: Reference | None):
        self.name = name
        self.training = training
        self.beta = training.beta if training.beta is not None else default_beta(name)
        self.reference = reference

    def units(self, batch):
        return int(batch["example_ids"].numel()) // 2  # two ids per pair in either layout

    def _logprobs(self, model, batch):
        return pair_logprobs(model, batch, self.training.loss_chunk_size)[0]

    def pair_losses(self, model, batch, logprobs=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(per-pair losses, chosen rewards, rejected rewards), each (P,). ``logprobs``: the policy's
        (summed log-probs, labelled tokens) per answer when the caller already has them."""
        logps, tokens = logprobs if logprobs is not None else pair_logprobs(model, batch, self.training.loss_chunk_size)
        chosen, rejected = logps.chunk(2)
        chosen_tokens, rejected_tokens = tokens.chunk(2)
        if self.name in ("dpo", "ipo"):
            ref_chosen, ref_rejected = self.reference.logprobs(model, batch, self._logprobs).chunk(2)
            if self.name == "dpo":
                losses = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, self.beta)
                if self.training.rpo_alpha is not None:
                    losses = losses + self.training.rpo_alpha * chosen_nll(chosen, chosen_tokens)
            else:
                losses = ipo_loss(chosen, rejected, ref_chosen, ref_rejected, chosen_tokens, rejected_tokens, self.beta)
            return losses, self.beta * (chosen - ref_chosen).detach(), self.beta * (rejected - ref_rejected).detach()
        chosen_reward = self.beta * chosen.detach() / chosen_tokens.clamp(min=1)
        rejected_reward = self.beta * rejected.detach() / rejected_tokens.clamp(min=1)
        if self.name == "simpo":
            losses = simpo_loss(chosen, rejected, chosen_tokens, rejected_tokens, self.beta, self.training.simpo_gamma)
        else:
            losses, _ = orpo_loss(chosen, rejected, chosen_tokens, rejected_tokens, self.beta)
        return losses, chosen_reward, rejected_reward

    def loss_sum(self, model, batch):
        losses, chosen_reward, rejected_reward = self.pair_losses(model, batch)
        return losses.sum(), _reward_metric_sums(chosen_reward, rejected_reward)

    def eval_loss_sum(self, model, batch):
        """As :meth:`loss_sum`, plus (DPO, IPO) ``kl``: the exact KL(policy || reference) summed over an
        answer's tokens, averaged over each pair's two answers: how far training has moved the policy.
        The policy's forward serves both the loss and the KL."""
        if self.reference is None:
            return self.loss_sum(model, batch)
        policy_hidden = labelled_hidden_states(model, batch)
        per_token = logprobs_from_hidden(model, batch, policy_hidden, self.training.loss_chunk_size)
        losses, chosen_reward, rejected_reward = self.pair_losses(model, batch, per_answer_sums(per_token, batch))
        metrics = _reward_metric_sums(chosen_reward, rejected_reward)
        reference_hidden = self.reference.run(model, batch, labelled_hidden_states)
        kl = token_kl(model, batch, policy_hidden, reference_hidden, self.training.loss_chunk_size)
        metrics["kl"] = float(per_answer_sums(kl, batch)[0].sum()) / 2
        return losses.sum(), metrics

    def evaluate(self, model, batches, device):
        return _evaluate_mean(self.eval_loss_sum, self.units, model, batches, self.training.precision, device)


class KtoObjective:
    """KTO: rows are single completions with ``kto_labels`` (1 desirable, 0 undesirable)."""

    name = "kto"

    def __init__(self, training, reference: Reference):
        self.training = training
        self.beta = training.beta if training.beta is not None else default_beta("kto")
        self.reference = reference

    def units(self, batch):
        return int(batch["input_ids"].shape[0])

    def _logprobs(self, model, batch):
        return sequence_logprobs(model, batch, self.training.loss_chunk_size)[0]

    def loss_sum(self, model, batch):
        policy = self._logprobs(model, batch)
        reference = self.reference.logprobs(model, batch, self._logprobs)
        desirable = batch["kto_labels"].bool()
        mismatched = {key[3:]: value for key, value in batch.items() if key.startswith("kl_")}
        with torch.no_grad():  # z_0 is a reference point: no gradient flows through it
            mismatched_policy = self._logprobs(model, mismatched)
            mismatched_reference = self.reference.uncached_logprobs(model, mismatched, self._logprobs)
        z0 = kl_reference_point(mismatched_policy, mismatched_reference)
        losses = kto_loss(policy, reference, desirable, z0, self.beta,
                          self.training.kto_desirable_weight, self.training.kto_undesirable_weight)
        rewards = self.beta * (policy - reference).detach()
        return losses.sum(), {"reward_desirable": float(rewards[desirable].sum()),
                              "reward_undesirable": float(rewards[~desirable].sum()),
                              "kl": float(z0) * len(rewards)}

    def evaluate(self, model, batches, device):
        return _evaluate_mean(self.loss_sum, self.units, model, batches, self.training.precision, device)


def default_beta(objective: str) -> float:
    """Each paper's usual strength: beta 0.1 for DPO/IPO/KTO (tau for IPO, lambda for ORPO), 2.0 for SimPO, 0.04 for GRPO."""
    return {"simpo": 2.0, "grpo": 0.04}.get(objective, 0.1)


def _reward_metric_sums(chosen: torch.Tensor, rejected: torch.Tensor) -> dict[str, float]:
    return {"reward_chosen": float(chosen.sum()), "reward_rejected": float(rejected.sum()),
            "reward_margin": float((chosen - rejected).sum()), "preference_accuracy": float((chosen > rejected).float().sum())}


def _evaluate_mean(loss_sum, units_of, model, batches, precision, device) -> tuple[float, dict[str, float]]:
    """Mean loss and metrics over held-out batches, without gradients: ``loss_sum(model, batch)`` gives
    (summed loss, summed metrics), ``units_of(batch)`` what they are averaged over."""
    was_training = model.training
    model.eval()
    total, units, sums = 0.0, 0, {}
    try:
        with torch.no_grad():
            for batch in batches:
                batch = {k: v.to(device) for k, v in batch.items()}
                with autocast(precision, device):
                    loss, metrics = loss_sum(model, batch)
                total += float(loss)
                units += units_of(batch)
                for key, value in metrics.items():
                    sums[key] = sums.get(key, 0.0) + value
    finally:
        model.train(was_training)
    units = max(units, 1)
    loss = total / units
    return (loss if math.isfinite(loss) else float("nan")), {f"eval_{k}": v / units for k, v in sums.items()}


def build_objective(config, tokenizer, policy_adapter: str) -> Objective:
    """The objective named by ``training.objective``, with its reference when it needs one."""
    training = config.training
    name = training.objective
    reference = Reference(training.reference, policy_adapter, training.cache_reference) if needs_reference(name) else None
    if name == "sft":
        return SupervisedObjective(training)
    if name in PAIRWISE:
        return PairwiseObjective(name, training, reference)
    if name == "kto":
        return KtoObjective(training, reference)
    from tuneforge.train.objectives.grpo_objective import GrpoObjective

    return GrpoObjective(config, tokenizer, reference)
