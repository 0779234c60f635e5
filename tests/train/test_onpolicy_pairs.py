"""On-policy pairs (one DNO-Prct iteration): chosen is the gold answer, rejected the policy's own
sampled mistakes. Oracles: a sampler whose outputs are known, and the pair file read back by the
preference loader and trained on with DPO."""

from __future__ import annotations

import json

import pytest
from tiny_models import save_tiny_chat_model, tiny_chat_model_and_tokenizer

from tuneforge.cli import main
from tuneforge.data import Example, Message
from tuneforge.data.preference import load_preference_records
from tuneforge.errors import ConfigError
from tuneforge.train.objectives import onpolicy_pairs as module


def problem(question, answer):
    return Example(messages=(Message("user", question), Message("assistant", answer)), answer=answer)


def fixed_sampler(answers_per_prompt, tokenizer):
    """A PolicySampler stand-in that 'samples' the given texts, to check what becomes a pair."""
    class Fixed:
        def __init__(self, *args, **kwargs):
            self.calls = 0

        def sample(self, model, prompts, copies, greedy):
            assert copies == len(answers_per_prompt[0]) and not greedy
            batch = answers_per_prompt[self.calls:self.calls + len(prompts)]
            self.calls += len(prompts)
            return [tokenizer.encode(text, add_special_tokens=False) for answers in batch for text in answers]
    return Fixed


def test_only_wrong_distinct_samples_become_rejected_answers(monkeypatch):
    model, tokenizer = tiny_chat_model_and_tokenizer()
    examples = [problem("one plus one", "2"), problem("two plus two", "4"), problem("three plus three", "6")]
    sampled = [["2", "3", "3", "5"],    # right, then the same mistake twice and another
               ["4", "4", "4", "4"],    # always right: nothing to learn, no pair
               ["", "7", "six", "6"]]   # an empty answer is not a rejected answer
    monkeypatch.setattr(module, "PolicySampler", fixed_sampler(sampled, tokenizer))
    records, stats = module.onpolicy_pairs(model, tokenizer, examples, samples=4, pairs_per_prompt=3,
                                           prompts_per_batch=2)
    got = [(r["prompt"][-1]["content"], r["chosen"][0]["content"], r["rejected"][0]["content"]) for r in records]
    assert got == [("one plus one", "2", "3"), ("one plus one", "2", "5"),
                   ("three plus three", "6", "7"), ("three plus three", "6", "six")]
    assert (stats.prompts, stats.samples, stats.correct_samples, stats.pairs) == (3, 12, 6, 4)


def test_one_pair_per_prompt_by_default(monkeypatch):
    model, tokenizer = tiny_chat_model_and_tokenizer()
    monkeypatch.setattr(module, "PolicySampler", fixed_sampler([["3", "5"]], tokenizer))
    records, _ = module.onpolicy_pairs(model, tokenizer, [problem("one plus one", "2")], samples=2)
    assert [r["rejected"][0]["content"] for r in records] == ["3"]


def test_bad_settings_are_refused():
    model, tokenizer = tiny_chat_model_and_tokenizer()
    with pytest.raises(ConfigError, match="samples=0"):
        module.onpolicy_pairs(model, tokenizer, [problem("q", "1")], samples=0)


def test_the_command_samples_a_real_policy_and_dpo_trains_on_its_pairs(tmp_path, one_torch_thread):
    model_dir = save_tiny_chat_model(tmp_path / "model")
    out = tmp_path / "pairs.jsonl"
    assert main(["pairs", "--model", model_dir, "--data", "arithmetic", "--size", "6", "--samples", "3",
                 "--max-new-tokens", "4", "--out", str(out)]) == 0
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert 1 <= len(lines) <= 6  # a random tiny model gets (almost) everything wrong: about one pair per prompt
    pairs, skipped = load_preference_records(str(out), "dpo")
    assert skipped == 0 and len(pairs) == len(lines)
    for pair, line in zip(pairs, lines):
        assert pair.chosen[-1].content == line["chosen"][0]["content"] != line["rejected"][0]["content"]
        assert pair.chosen[-1].content.isdigit()  # the arithmetic task's gold answer
    from tuneforge.config import parse_train_config
    from tuneforge.train import train

    config = parse_train_config({"model": model_dir, "output_dir": str(tmp_path / "dpo"), "adapter": {"r": 4},
                                 "data": {"train": str(out), "max_seq_len": 256, "eval_size": 0},
                                 "training": {"objective": "dpo", "max_steps": 2, "batch_size": 2, "lr": 1e-2}})
    assert train(config).steps == 2


def test_the_command_refuses_an_output_folder_that_does_not_exist(tmp_path, capsys):
    code = main(["pairs", "--data", "arithmetic", "--out", str(tmp_path / "missing" / "pairs.jsonl")])
    assert code != 0 and "does not exist" in " ".join(capsys.readouterr().err.split())
