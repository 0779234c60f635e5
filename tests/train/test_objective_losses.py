"""Each preference/reward loss against TRL's own code on the same log-probs (value and gradient),
or, where TRL's loss cannot be reached without a full trainer (KTO, GRPO), against the paper's
equation written out here with Python floats."""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from tuneforge.train.objectives.dpo import dpo_loss
from tuneforge.train.objectives.grpo import group_advantages, grpo_loss
from tuneforge.train.objectives.ipo import ipo_loss
from tuneforge.train.objectives.kto import kl_reference_point, kto_loss
from tuneforge.train.objectives.orpo import orpo_loss
from tuneforge.train.objectives.simpo import simpo_loss

trl = pytest.importorskip("trl")

PAIRS, LENGTH = 3, 7


def per_token_batch(seed: int = 0):
    """Per-token log-probs (2P, T-1) for rows [chosen..., rejected...], zero outside each completion,
    with completions of different lengths, and the completion mask (2P, T)."""
    generator = torch.Generator().manual_seed(seed)
    completion_mask = torch.zeros(2 * PAIRS, LENGTH, dtype=torch.long)
    for row, start in enumerate([2, 3, 1, 4, 2, 3]):
        completion_mask[row, start:LENGTH - row % 2] = 1
    logps = -torch.rand(2 * PAIRS, LENGTH - 1, generator=generator, dtype=torch.float64) * 3
    logps = (logps * completion_mask[:, 1:]).requires_grad_()
    ref = (-torch.rand(2 * PAIRS, generator=generator, dtype=torch.float64) * 3 * completion_mask[:, 1:].sum(1))
    return logps, ref, completion_mask


def trl_dpo_loss(per_token: torch.Tensor, ref: torch.Tensor, completion_mask: torch.Tensor, loss_type: str, beta: float):
    """TRL's DPOTrainer._compute_loss on given per-token log-probs: a stand-in model returns them as
    TRL's fused LM head would, and the reference log-probs are 'precomputed'."""
    from trl import DPOTrainer

    rows, width = per_token.shape
    outputs = SimpleNamespace(log_probs=per_token, entropy=torch.zeros(rows, width), mean_logits=torch.zeros(rows, width),
                              is_top1=torch.zeros(rows, width, dtype=torch.bool))
    identity = lambda x: x  # noqa: E731  (one process: gathering is the identity)
    trainer = SimpleNamespace(
        model=SimpleNamespace(training=True), accelerator=SimpleNamespace(device="cpu", gather_for_metrics=identity, gather=identity),
        aux_loss_enabled=False, precompute_ref_logps=True, ld_alpha=None, f_divergence_type="reverse_kl",
        loss_types=[loss_type], loss_weights=[1.0], beta=beta, use_weighting=False, label_smoothing=0.0,
        _metrics=defaultdict(lambda: defaultdict(list)), _total_train_tokens=0, _tp_size=1)
    ref_chosen, ref_rejected = ref.chunk(2)
    inputs = {"input_ids": torch.zeros(rows, width + 1, dtype=torch.long), "attention_mask": torch.ones(rows, width + 1),
              "completion_mask": completion_mask, "ref_chosen_logps": ref_chosen, "ref_rejected_logps": ref_rejected}
    return DPOTrainer._compute_loss(trainer, lambda **kwargs: outputs, inputs, return_outputs=False)


def ours(loss_fn, per_token, ref, completion_mask, **kwargs):
    sums = per_token.sum(dim=1)
    tokens = completion_mask[:, 1:].sum(dim=1)
    chosen, rejected = sums.chunk(2)
    ref_chosen, ref_rejected = ref.chunk(2)
    if loss_fn is dpo_loss:
        return dpo_loss(chosen, rejected, ref_chosen, ref_rejected, **kwargs).mean()
    return ipo_loss(chosen, rejected, ref_chosen, ref_rejected, *tokens.chunk(2), **kwargs).mean()


def value_and_grad(fn, leaf):
    leaf.grad = None
    value = fn()
    value.backward()
    return float(value.detach()), leaf.grad.clone()


@pytest.mark.parametrize(("loss_fn", "loss_type", "strength"), [(dpo_loss, "sigmoid", 0.1), (ipo_loss, "ipo", 0.5)])
def test_dpo_and_ipo_equal_trl_value_and_gradient(loss_fn, loss_type, strength):
    per_token, ref, mask = per_token_batch()
    keyword = "beta" if loss_fn is dpo_loss else "tau"
    mine, my_grad = value_and_grad(lambda: ours(loss_fn, per_token, ref, mask, **{keyword: strength}), per_token)
    theirs, their_grad = value_and_grad(lambda: trl_dpo_loss(per_token, ref, mask, loss_type, strength), per_token)
    assert mine == pytest.approx(theirs, abs=1e-5)
    assert torch.allclose(my_grad, their_grad, atol=1e-5)


def test_dpo_and_ipo_are_different_objectives_on_the_same_pairs():
    per_token, ref, mask = per_token_batch()
    dpo = float(ours(dpo_loss, per_token, ref, mask, beta=0.1))
    ipo = float(ours(ipo_loss, per_token, ref, mask, tau=0.1))
    assert abs(dpo - ipo) > 1e-2


def test_dpo_is_log_two_when_policy_equals_reference():
    chosen, rejected = torch.tensor([-5.0, -2.0]), torch.tensor([-4.0, -9.0])
    assert torch.allclose(dpo_loss(chosen, rejected, chosen, rejected, beta=0.3), torch.full((2,), math.log(2)))


def test_simpo_equals_trl_cpo_simpo():
    from trl.experimental.cpo import CPOTrainer

    per_token, _, mask = per_token_batch(1)
    tokens = mask[:, 1:].sum(dim=1)
    beta, gamma = 2.0, 0.7
    trainer = SimpleNamespace(alpha=0.0, loss_type="simpo", simpo_gamma=gamma, beta=beta, label_smoothing=0.0,
                              accelerator=SimpleNamespace(device="cpu"))

    def mine():
        chosen, rejected = per_token.sum(1).chunk(2)
        return simpo_loss(chosen, rejected, *tokens.chunk(2), beta=beta, gamma=gamma).mean()

    def theirs():  # CPO's simpo loss takes length-averaged log-probs
        average = per_token.sum(1) / tokens
        return CPOTrainer.cpo_loss(trainer, *average.chunk(2))[0].mean()

    mine_value, mine_grad = value_and_grad(mine, per_token)
    their_value, their_grad = value_and_grad(theirs, per_token)
    assert mine_value == pytest.approx(their_value, abs=1e-5)
    assert torch.allclose(mine_grad, their_grad, atol=1e-5)


def test_orpo_odds_ratio_term_equals_trl_and_adds_the_chosen_nll():
    from trl.experimental.orpo import ORPOTrainer

    per_token, _, mask = per_token_batch(2)
    tokens = mask[:, 1:].sum(dim=1)
    lam = 0.25
    trainer = SimpleNamespace(beta=lam, accelerator=SimpleNamespace(device="cpu"))

    def mine():
        chosen, rejected = per_token.sum(1).chunk(2)
        return orpo_loss(chosen, rejected, *tokens.chunk(2), lam=lam)[1].mean()

    def theirs():  # TRL returns lambda * log sigma(log odds ratio); the loss subtracts it
        average = per_token.sum(1) / tokens
        return -ORPOTrainer.odds_ratio_loss(trainer, *average.chunk(2))[0].mean() / lam

    mine_value, mine_grad = value_and_grad(mine, per_token)
    their_value, their_grad = value_and_grad(theirs, per_token)
    assert mine_value == pytest.approx(their_value, abs=1e-5)
    assert torch.allclose(mine_grad, their_grad, atol=1e-5)
    chosen, rejected = per_token.detach().sum(1).chunk(2)
    total, term = orpo_loss(chosen, rejected, *tokens.chunk(2), lam=lam)
    nll = -(chosen / tokens.chunk(2)[0])  # Eq. 2: the chosen answer's mean token NLL
    assert torch.allclose(total, nll + lam * term)


def test_kto_equals_the_paper_equation():
    policy = torch.tensor([-4.0, -6.5, -3.0, -8.0], dtype=torch.float64)
    reference = torch.tensor([-4.5, -6.0, -3.2, -7.0], dtype=torch.float64)
    desirable = torch.tensor([True, False, True, False])
    mismatched_policy = torch.tensor([-9.0, -7.0, -8.0, -6.0], dtype=torch.float64)
    mismatched_reference = torch.tensor([-9.5, -7.2, -8.1, -6.4], dtype=torch.float64)
    beta, lam_d, lam_u = 0.5, 1.0, 1.5
    z0 = kl_reference_point(mismatched_policy, mismatched_reference)
    losses = kto_loss(policy, reference, desirable, z0, beta, lam_d, lam_u)

    sigma = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    z = max(0.0, statistics.fmean(p - r for p, r in zip(mismatched_policy.tolist(), mismatched_reference.tolist())))
    for loss, p, r, good in zip(losses.tolist(), policy.tolist(), reference.tolist(), desirable.tolist()):
        reward = p - r
        value = lam_d * sigma(beta * (reward - z)) if good else lam_u * sigma(beta * (z - reward))
        assert loss == pytest.approx((lam_d if good else lam_u) - value, abs=1e-12)


def test_kto_reference_point_is_never_negative_and_carries_no_gradient():
    policy = torch.tensor([-5.0, -5.0], requires_grad=True)
    z0 = kl_reference_point(policy, torch.tensor([-1.0, -1.0]))
    assert float(z0) == 0.0 and not z0.requires_grad


def test_group_advantages_are_normalised_within_each_group():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0])  # two groups of 4; the second all equal
    advantages = group_advantages(rewards, group_size=4)
    first = [1.0, 0.0, 0.0, 1.0]
    mean, std = statistics.fmean(first), statistics.stdev(first)
    assert advantages[:4].tolist() == pytest.approx([(r - mean) / (std + 1e-4) for r in first], abs=1e-6)
    assert advantages[4:].tolist() == [0.0] * 4  # no signal in a group whose samples all scored the same


def test_grpo_loss_equals_the_paper_equation():
    generator = torch.Generator().manual_seed(3)
    logps = -torch.rand(4, 5, generator=generator, dtype=torch.float64)
    old = logps + 0.3 * torch.randn(4, 5, generator=generator, dtype=torch.float64)  # ratios on both sides of the clip
    ref = logps + 0.2 * torch.randn(4, 5, generator=generator, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0], [1, 1, 1, 1, 0]], dtype=torch.float64)
    advantages = torch.tensor([1.2, -0.7, 0.4, -1.5], dtype=torch.float64)
    eps, beta = 0.2, 0.04
    losses, _ = grpo_loss(logps, old, ref, mask, advantages, eps, beta)

    for i in range(4):
        terms = []
        for t in range(5):
            if not mask[i, t]:
                continue
            ratio = math.exp(logps[i, t] - old[i, t])
            clipped = min(max(ratio, 1 - eps), 1 + eps)
            ref_over_policy = math.exp(ref[i, t] - logps[i, t])
            kl = ref_over_policy - math.log(ref_over_policy) - 1  # Eq. 4
            terms.append(min(ratio * advantages[i], clipped * advantages[i]) - beta * kl)
        assert float(losses[i]) == pytest.approx(-statistics.fmean(terms), abs=1e-12)
