"""GRPO in the loop: the loss on fixed samples against Eq. 3 written out with Python floats, and
reward functions that raise or return NaN."""

from __future__ import annotations

import json
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


def write_prompts(path, questions):
    with path.open("w") as f:
        for question, answer in questions:
            f.write(json.dumps({"messages": [{"role": "user", "content": question},
                                             {"role": "assistant", "content": answer}]}) + "\n")
    return path


def test_a_prompt_too_long_for_max_seq_len_is_a_bad_record(tmp_path):
    from tuneforge.errors import DataError
    from tuneforge.train.objectives.grpo_objective import prepare_prompt_data

    path = write_prompts(tmp_path / "prompts.jsonl", [("Tom has 3 apples. How many?", "3"), ("apples " * 200, "4")])
    _, tokenizer = tiny_chat_model_and_tokenizer()

    def config(on_bad_record):
        return parse_train_config({"data": {"train": str(path), "max_seq_len": 96, "eval_size": 0,
                                            "on_bad_record": on_bad_record},
                                   "training": {"objective": "grpo", "grpo_max_new_tokens": 8}})

    with pytest.raises(DataError, match=r"prompts.jsonl:2: the prompt \(\d+ tokens\) plus grpo_max_new_tokens"):
        prepare_prompt_data(config("error"), tokenizer)
    prepared = prepare_prompt_data(config("skip"), tokenizer)
    assert prepared.train_examples == 1 and prepared.skipped_records == 1


def test_a_reward_function_that_raises_or_returns_nan_does_not_stop_the_run(tmp_path, monkeypatch, one_torch_thread):
    from tuneforge.train import train

    module = tmp_path / "broken_rewards.py"
    module.write_text("def score(completions, answers):\n"
                      "    if len(completions) > 1:\n        raise RuntimeError('batch scoring is broken')\n"
                      "    if len(completions[0]) % 2:\n        raise ValueError('cannot score this one')\n"
                      "    return [float('nan')]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    path = write_prompts(tmp_path / "prompts.jsonl", [(f"Tom has {i} apples. How many?", str(i)) for i in range(4)])
    config = parse_train_config({
        "output_dir": str(tmp_path / "run"), "adapter": {"r": 4},
        "data": {"train": str(path), "eval": str(path), "max_seq_len": 96},
        "training": {"objective": "grpo", "grpo_reward": "broken_rewards:score", "grpo_group_size": 2,
                     "grpo_max_new_tokens": 3, "max_steps": 2, "batch_size": 2, "log_every": 1, "eval_every": 2}})
    summary = train(config, model_and_tokenizer=tiny_chat_model_and_tokenizer())
    lines = [json.loads(line) for line in (summary.run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [line for line in lines if "train_loss" in line]
    assert [line["step"] for line in steps] == [1, 2]
    assert all(line["reward_failures"] > 0 and math.isfinite(line["train_loss"]) for line in steps)
    assert [line["eval_reward"] for line in lines if "eval_reward" in line] == [0.0, 0.0]  # failures score 0


@pytest.mark.parametrize(("completion", "gold", "expected"), [
    ("The answer is 7.", "7", 1.0), ("7", "7", 1.0), ("7.0", "7", 1.0), ("It costs 1,000 coins", "1000", 1.0),
    ("-3", "-3", 1.0), ("7 then 8", "7", 0.0), ("17", "7", 0.0), ("no number here", "7", 0.0),
])
def test_numeric_reward_compares_the_last_number(completion, gold, expected):
    from tuneforge.train.objectives.rewards import resolve_reward

    assert resolve_reward("numeric")([completion], [gold]) == [expected]


def test_numeric_reward_on_a_non_numeric_gold_answer_is_a_counted_failure():
    from tuneforge.train.objectives.rewards import resolve_reward

    values, failed = safe_rewards(resolve_reward("numeric"), ["7", "8"], ["seven", "8"])
    assert values == [None, 1.0] and failed == 1


@pytest.mark.parametrize(("completion", "expected"), [("The answer is 7.", 1.0), ("17 apples", 0.0), ("7.5", 0.0)])
def test_contains_reward_matches_the_gold_as_a_whole_number(completion, expected):
    from tuneforge.train.objectives.rewards import resolve_reward

    assert resolve_reward("contains")([completion], ["7"]) == [expected]


@pytest.mark.parametrize("completion, gold, expected", [
    ("The answer is <answer>42</answer>.", "42", 1.0),
    ("<answer> 42 </answer>", "42", 1.0),   # exact match's normalisation: surrounding spaces
    ("<answer>41</answer> then <answer>42</answer>", "42", 0.0),  # the first match counts
    ("42 without tags", "42", 0.0),
])
def test_regex_reward_compares_the_first_group_of_the_first_match(completion, gold, expected):
    from tuneforge.train.objectives.rewards import resolve_reward

    assert resolve_reward(r"regex:<answer>(.*?)</answer>")([completion], [gold]) == [expected]


def test_regex_reward_without_a_group_compares_the_whole_match():
    from tuneforge.train.objectives.rewards import resolve_reward

    reward = resolve_reward(r"regex:\d+")
    assert reward(["box 7", "no digits"], ["7", "7"]) == [1.0, 0.0]


def test_format_reward_checks_the_whole_reply_and_ignores_the_answer():
    from tuneforge.train.objectives.rewards import resolve_reward

    reward = resolve_reward(r"format:<think>.+</think>\s*<answer>.+</answer>")
    replies = ["<think>a\nb</think> <answer>3</answer>", "<answer>3</answer>", "<think>x</think><answer>3</answer> extra"]
    assert reward(replies, ["999"] * 3) == [1.0, 0.0, 0.0]


def test_a_pattern_that_does_not_compile_is_a_config_error_before_the_model_loads(tmp_path):
    from tuneforge.config import parse_train_config
    from tuneforge.errors import ConfigError
    from tuneforge.train.loop import check_objective_combinations

    config = parse_train_config({"output_dir": str(tmp_path / "run"), "adapter": {"method": "lora"},
                                 "training": {"objective": "grpo", "grpo_reward": "regex:(unclosed"}})
    with pytest.raises(ConfigError, match=r"grpo_reward='regex:\(unclosed'.*does not compile"):
        check_objective_combinations(config)
