"""GRPO in the loop: the loss on fixed samples against Eq. 3 written out with Python floats, and
reward functions that raise or return NaN."""

from __future__ import annotations

import math
import statistics

import pytest
import torch
import torch.nn.functional as F
from tiny_models import perturb_trainable, tiny_chat_model_and_tokenizer

from tuneforge.adapters import add_adapter
from tuneforge.adapters.config import LoraConfig
from tuneforge.adapters.model import disabled_adapters
from tuneforge.config import parse_train_config
from tuneforge.train.objectives.grpo_objective import GrpoObjective, PromptPlan
from tuneforge.train.objectives.reference import Reference
from tuneforge.train.objectives.rewards import safe_rewards

GROUP = 3


def rewards_by_length(completions, answers):
    return [float(len(c)) for c in completions]


def objective_and_model():
    config = parse_train_config({"training": {"objective": "grpo", "grpo_group_size": GROUP, "beta": 0.3}})
    model, tokenizer = tiny_chat_model_and_tokenizer()
    add_adapter(model, LoraConfig(r=4), "default")
    perturb_trainable(model, scale=0.3)  # policy != reference, so the KL term is not zero
    objective = GrpoObjective(config, tokenizer, Reference("adapter_off", "default", cache=False))
    objective.reward_fn = rewards_by_length
    return objective, model, tokenizer


def definition_logprobs(model, prompt, completion):
    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        logp = F.log_softmax(model(input_ids=ids).logits[0, :-1].float(), dim=-1)
    return [float(logp[len(prompt) - 1 + t, token]) for t, token in enumerate(completion)]


def test_grpo_loss_on_fixed_samples_equals_equation_3():
    objective, model, tokenizer = objective_and_model()
    prompts = [tokenizer("Tom has 3 apples.")["input_ids"], tokenizer("Ann has 2")["input_ids"]]
    completions = [tokenizer(text)["input_ids"] for text in ["7", "seven apples", "3", "box", "2", "Ann has"]]
    objective.sample = lambda model, prompts, greedy: completions  # fixed samples
    batch = PromptPlan([(p, "x") for p in prompts], batch_size=2, seed=0, pad_id=0, shuffle=False).collate([0, 1])
    loss, metrics = objective.loss_sum(model, batch)

    texts = [tokenizer.decode(c).strip() for c in completions]
    expected = 0.0
    for g in range(2):
        group = [float(len(t)) for t in texts[g * GROUP:(g + 1) * GROUP]]
        mean, std = statistics.fmean(group), statistics.stdev(group)
        per_sample = []
        for i in range(GROUP):
            completion = completions[g * GROUP + i]
            policy = definition_logprobs(model, prompts[g], completion)
            with disabled_adapters(model):
                reference = definition_logprobs(model, prompts[g], completion)
            advantage = (group[i] - mean) / (std + 1e-4)
            terms = []
            for p, r in zip(policy, reference):
                kl = math.exp(r - p) - (r - p) - 1
                terms.append(1.0 * advantage - 0.3 * kl)  # ratio pi/pi_old is 1 on the sampling step
            per_sample.append(-statistics.fmean(terms))
        expected += statistics.fmean(per_sample)
    assert float(loss) == pytest.approx(expected, abs=1e-5)
    assert metrics["reward"] == pytest.approx(sum(statistics.fmean(len(t) for t in texts[g * 3:g * 3 + 3]) for g in range(2)))
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters() if p.requires_grad)


def test_rewards_that_raise_or_are_nan_are_counted_not_fatal():
    def flaky(completions, answers):
        if len(completions) > 1:
            raise RuntimeError("batch failed")
        if completions[0] == "boom":
            raise ValueError("bad sample")
        return [float("nan")] if completions[0] == "nan" else [1.0]

    values, failed = safe_rewards(flaky, ["ok", "boom", "nan", "ok"], ["a"] * 4)
    assert values == [1.0, None, None, 1.0] and failed == 2
    objective, _, tokenizer = objective_and_model()
    objective.reward_fn = flaky
    group = [tokenizer(text)["input_ids"] for text in ("ok", "boom", "nan")]
    rewards, failed = objective.score(group, ["a"] * GROUP)
    assert failed == 2
    assert rewards.tolist() == [1.0, 1.0, 1.0]  # failures take the group's mean: no push either way
