"""Preference objectives inside `tuneforge train`: log-probs, the adapter-off reference and its
cache, and a tiny model that learns to prefer the chosen answers."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from tiny_models import perturb_trainable, tiny_chat_model_and_tokenizer, tiny_llama

from tuneforge.adapters import add_adapter
from tuneforge.adapters.config import LoraConfig
from tuneforge.config import parse_train_config
from tuneforge.errors import ConfigError
from tuneforge.train import train
from tuneforge.train.objectives.logprobs import labelled_hidden_states, per_answer_sums, sequence_logprobs, token_kl, token_logprobs
from tuneforge.train.objectives.reference import Reference


def labelled_batch():
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, 128, (3, 10), generator=generator)
    labels = input_ids.clone()
    labels[:, :4] = -100
    labels[1, 7:] = -100
    return {"input_ids": input_ids, "labels": labels, "attention_mask": torch.ones_like(input_ids),
            "example_ids": torch.tensor([10, 11, 12])}


def full_logits_logprobs(model, batch):
    """The definition: log_softmax over the whole vocabulary at every position, summed over labels."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    logp = F.log_softmax(logits[:, :-1], dim=-1)
    labels = batch["labels"][:, 1:]
    picked = logp.gather(2, labels.clamp(min=0)[..., None]).squeeze(-1)
    return (picked * (labels != -100)).sum(dim=1)


def test_chunked_sequence_logprobs_equal_the_full_logits_definition():
    model, batch = tiny_llama(), labelled_batch()
    summed, counts = sequence_logprobs(model, batch, chunk_size=3)
    assert torch.allclose(summed, full_logits_logprobs(model, batch), atol=1e-5)
    assert counts.tolist() == [6, 3, 6]  # labels at positions 4..9 (row 1: 4..6)
    per_token, mask = token_logprobs(model, batch, chunk_size=4)
    assert float(per_token.detach()[~mask].abs().sum()) == 0.0


def test_reference_is_the_base_model_and_is_cached():
    base = tiny_llama()
    batch = labelled_batch()
    expected = full_logits_logprobs(base, batch)
    model = tiny_llama()
    add_adapter(model, LoraConfig(r=4), "default")
    perturb_trainable(model, scale=0.2)
    policy = sequence_logprobs(model, batch)[0]
    assert not torch.allclose(policy, expected, atol=1e-3)  # the adapter changes the policy ...
    reference = Reference("adapter_off", "default", cache=True)
    logprob_fn = lambda m, b: sequence_logprobs(m, b)[0]  # noqa: E731
    assert torch.allclose(reference.logprobs(model, batch, logprob_fn), expected, atol=1e-5)  # ... not the reference
    calls = []
    assert torch.allclose(reference.logprobs(model, batch, lambda m, b: calls.append(1)), expected, atol=1e-5)
    assert calls == []  # second time: from the cache
    assert torch.allclose(sequence_logprobs(model, batch)[0], policy)  # the adapter is back on


def test_token_kl_is_the_full_vocabulary_kl_of_policy_from_reference():
    batch = labelled_batch()
    model = tiny_llama()
    add_adapter(model, LoraConfig(r=4), "default")
    perturb_trainable(model, scale=0.2)
    reference = Reference("adapter_off", "default", cache=False)
    with torch.no_grad():
        policy_hidden = labelled_hidden_states(model, batch)
    per_token = token_kl(model, batch, policy_hidden, reference.run(model, batch, labelled_hidden_states), chunk_size=4)
    with torch.no_grad():  # the definition, on whole-sequence logits: sum_v p (log p - log q)
        policy = F.log_softmax(model(input_ids=batch["input_ids"]).logits[:, :-1].float(), dim=-1)
        base = tiny_llama()
        reference_logp = F.log_softmax(base(input_ids=batch["input_ids"]).logits[:, :-1].float(), dim=-1)
    expected = (policy.exp() * (policy - reference_logp)).sum(-1) * (batch["labels"][:, 1:] != -100)
    assert torch.allclose(per_token, expected, atol=1e-5)
    assert float(expected.sum()) > 1e-3  # the adapter moved the policy, so the check has something to see
    sums, counts = per_answer_sums(per_token, batch)
    assert torch.allclose(sums, expected.sum(dim=1)) and counts.tolist() == [6, 3, 6]


def preference_file(tmp_path, pairs=8):
    path = tmp_path / "pairs.jsonl"
    with path.open("w") as f:
        for i in range(pairs):
            f.write(json.dumps({"prompt": f"Tom has {i} apples. How many?", "chosen": str(i), "rejected": f"{i + 3} apples"}) + "\n")
    return path


def preference_config(tmp_path, objective, data, **training):
    settings = {"objective": objective, "max_steps": 8, "batch_size": 4, "lr": 2e-2, "log_every": 1,
                "warmup_steps": 0, "scheduler": "constant", "seed": 0}
    settings.update(training)
    return parse_train_config({"output_dir": str(tmp_path / objective), "adapter": {"r": 4},
                               "data": {"train": str(data), "eval": str(data), "max_seq_len": 96}, "training": settings})


def eval_records(run_dir):
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [line for line in lines if "eval_loss" in line]


def test_dpo_steps_grow_the_chosen_vs_rejected_margin(tmp_path, one_torch_thread):
    summary = train(preference_config(tmp_path, "dpo", preference_file(tmp_path)), model_and_tokenizer=tiny_chat_model_and_tokenizer())
    first, last = eval_records(summary.run_dir)[0], eval_records(summary.run_dir)[-1]
    assert first["eval_reward_margin"] == 0.0  # a fresh LoRA is the reference: no margin yet
    assert first["eval_loss"] == pytest.approx(0.6931, abs=1e-4)  # log 2
    assert first["eval_kl"] == pytest.approx(0.0, abs=1e-6)
    assert last["eval_kl"] > 1e-4  # training moved the policy away from its reference
    assert last["eval_reward_margin"] > 0.05
    assert last["eval_preference_accuracy"] == 1.0
    assert last["eval_loss"] < first["eval_loss"]


@pytest.mark.parametrize("objective", ["ipo", "simpo", "orpo"])
def test_other_pairwise_objectives_prefer_chosen_after_training(tmp_path, objective, one_torch_thread):
    summary = train(preference_config(tmp_path, objective, preference_file(tmp_path)), model_and_tokenizer=tiny_chat_model_and_tokenizer())
    records = eval_records(summary.run_dir)
    assert records[-1]["eval_loss"] < records[0]["eval_loss"]
    assert records[-1]["eval_reward_margin"] > records[0]["eval_reward_margin"]


def test_kto_trains_on_labelled_completions(tmp_path, one_torch_thread):
    path = tmp_path / "kto.jsonl"
    with path.open("w") as f:
        for i in range(8):
            f.write(json.dumps({"prompt": f"Tom has {i} apples.", "completion": str(i) if i % 2 else f"{i + 3} apples",
                                "label": bool(i % 2)}) + "\n")
    summary = train(preference_config(tmp_path, "kto", path), model_and_tokenizer=tiny_chat_model_and_tokenizer())
    records = eval_records(summary.run_dir)
    assert records[-1]["eval_loss"] < records[0]["eval_loss"]
    assert records[-1]["eval_reward_desirable"] > records[-1]["eval_reward_undesirable"]


def test_init_adapter_reference_needs_an_init_adapter():
    with pytest.raises(ConfigError, match="init_adapter"):
        parse_train_config({"training": {"objective": "dpo", "reference": "init_adapter"}})


def test_dpo_from_an_sft_adapter_starts_at_zero_margin_against_its_frozen_copy(tmp_path, one_torch_thread):
    sft = parse_train_config({"output_dir": str(tmp_path / "sft"), "adapter": {"r": 4},
                              "data": {"train": "arithmetic", "options": {"size": 8}, "max_seq_len": 160, "eval_size": 0},
                              "training": {"max_steps": 2, "batch_size": 4, "lr": 2e-2}})
    sft_adapter = train(sft, model_and_tokenizer=tiny_chat_model_and_tokenizer()).adapter_dir
    config = preference_config(tmp_path, "dpo", preference_file(tmp_path), max_steps=3,
                               init_adapter=str(sft_adapter), reference="init_adapter")
    summary = train(config, model_and_tokenizer=tiny_chat_model_and_tokenizer())
    records = eval_records(summary.run_dir)
    assert records[0]["eval_reward_margin"] == pytest.approx(0.0, abs=1e-6)  # policy == its frozen starting copy
    assert records[0]["eval_loss"] == pytest.approx(0.6931, abs=1e-4)
    assert records[-1]["eval_reward_margin"] > 0.0


@pytest.mark.parametrize("name", ["dpo_arithmetic.yaml", "grpo_arithmetic.yaml", "dpo_onpolicy_arithmetic.yaml"])
def test_example_configs_are_valid(name):
    import pathlib

    import yaml

    path = pathlib.Path(__file__).parents[2] / "examples" / name
    config = parse_train_config(yaml.safe_load(path.read_text()), str(path))
    assert config.training.objective in ("dpo", "grpo")


def test_train_help_documents_the_objective_keys():
    from tuneforge.config.schema import describe_keys

    text = describe_keys()
    for key in ("training.objective", "training.beta", "training.reference", "training.init_adapter",
                "training.cache_reference", "training.grpo_group_size", "training.grpo_reward"):
        assert key in text


def test_pairs_holding_their_prompt_once_give_the_log_probs_of_separate_sequences():
    from tuneforge.data.preference import PreferencePair, PreferencePlan, tokenize_records
    from tuneforge.data.records import Message
    from tuneforge.train.objectives.logprobs import pair_logprobs

    model, tokenizer = tiny_chat_model_and_tokenizer()
    pairs = [PreferencePair((Message("user", f"Tom has {i} apples. How many apples does Tom have now?"),),
                            (Message("assistant", str(i)),), (Message("assistant", f"{i + 2} apples, I am fine"),))
             for i in range(3)]
    items, _ = tokenize_records(pairs, tokenizer, "auto", 96, "error", "pairs")
    separate = PreferencePlan(items, 3, 0, 0, shuffle=False).collate([0, 1, 2])
    shared = PreferencePlan(items, 3, 0, 0, shuffle=False, share_prompt=True).collate([0, 1, 2])
    assert shared["input_ids"].shape[0] == 3 and separate["input_ids"].shape[0] == 6
    assert shared["input_ids"].numel() < separate["input_ids"].numel()  # the prompt is computed once
    with torch.no_grad():
        expected_sums, expected_counts = pair_logprobs(model, separate)
        sums, counts = pair_logprobs(model, shared, chunk_size=5)
    assert counts.tolist() == expected_counts.tolist()
    assert torch.allclose(sums, expected_sums, atol=1e-5)


def test_an_interrupted_dpo_run_resumes_to_the_same_losses(tmp_path, one_torch_thread):
    data = preference_file(tmp_path)
    full = []
    train(preference_config(tmp_path, "dpo", data, max_steps=4, batch_size=2, save_every=1),
          model_and_tokenizer=tiny_chat_model_and_tokenizer(), on_step=lambda s, loss: full.append(loss))

    def stop_after_two(step, loss):
        if step == 2:
            raise KeyboardInterrupt

    partial = preference_config(tmp_path / "partial", "dpo", data, max_steps=4, batch_size=2, save_every=1)
    assert train(partial, model_and_tokenizer=tiny_chat_model_and_tokenizer(), on_step=stop_after_two).interrupted
    resumed = []
    train(partial, resume=True, model_and_tokenizer=tiny_chat_model_and_tokenizer(), on_step=lambda s, loss: resumed.append(loss))
    assert resumed == pytest.approx(full[2:], rel=1e-5, abs=1e-6)  # the reference cache is rebuilt, not saved


def test_objectives_other_than_sft_refuse_full_finetuning_and_data_select(tmp_path):
    """Both combinations would silently do something else (no adapter to switch off; selection ignored)."""
    from tuneforge.config.schema import parse_train_config
    from tuneforge.errors import ConfigError
    from tuneforge.train.loop import check_objective_combinations

    base = {"model": "smollm2-135m", "output_dir": str(tmp_path), "data": {"train": "arithmetic"},
            "training": {"objective": "dpo"}}
    check_objective_combinations(parse_train_config(base))  # an adapter run without selection is fine
    full = {**base, "adapter": {"method": "full"}}
    with pytest.raises(ConfigError, match="needs an adapter"):
        check_objective_combinations(parse_train_config(full))
    selected = {**base, "data": {"train": "arithmetic", "select": {"strategy": "random", "budget": 0.5}}}
    with pytest.raises(ConfigError, match="data.select"):
        check_objective_combinations(parse_train_config(selected))


def test_rpo_alpha_adds_the_chosen_answers_length_normalised_nll():
    """Pang et al. 2024's DPO+NLL: each pair's loss grows by alpha * (-log pi(y_w|x) / |y_w|)."""
    from tuneforge.train.objectives.base import PairwiseObjective

    model = tiny_llama()
    add_adapter(model, LoraConfig(r=4), "default")
    perturb_trainable(model, scale=0.2)
    batch = labelled_batch()
    batch = {key: torch.cat([value, value[:1]]) for key, value in batch.items()}  # 4 rows: 2 chosen, 2 rejected
    batch["example_ids"] = torch.arange(4)
    plain = PairwiseObjective("dpo", parse_train_config({"training": {"objective": "dpo"}}).training,
                              Reference("adapter_off", "default", cache=False))
    with_nll = PairwiseObjective("dpo", parse_train_config({"training": {"objective": "dpo", "rpo_alpha": 0.5}}).training,
                                 Reference("adapter_off", "default", cache=False))
    with torch.no_grad():
        extra = with_nll.pair_losses(model, batch)[0] - plain.pair_losses(model, batch)[0]
        chosen_logp = full_logits_logprobs(model, batch)[:2]
    chosen_tokens = (batch["labels"][:2, 1:] != -100).sum(dim=1)
    assert torch.allclose(extra, 0.5 * (-chosen_logp / chosen_tokens), atol=1e-5)
    assert float(extra.min()) > 0


def test_rpo_alpha_is_refused_for_other_objectives():
    with pytest.raises(ConfigError, match="rpo_alpha"):
        parse_train_config({"training": {"objective": "ipo", "rpo_alpha": 1.0}})
