"""Several preference pairs per row (each holding its prompt once): the log-probs, the DPO loss and
its gradients equal those of every answer run as its own sequence."""

from __future__ import annotations

import json

import pytest
import torch
from tiny_models import perturb_trainable, tiny_chat_model_and_tokenizer

from tuneforge.adapters import add_adapter
from tuneforge.adapters.config import LoraConfig
from tuneforge.config import parse_train_config
from tuneforge.data.preference import PreferencePair, PreferencePlan, tokenize_records
from tuneforge.data.records import Message
from tuneforge.train import train
from tuneforge.train.objectives.base import PairwiseObjective
from tuneforge.train.objectives.logprobs import pair_logprobs
from tuneforge.train.objectives.reference import Reference

ROW_TOKENS = 160
PAIRS = 7


def varied_pairs(tokenizer):
    """Pairs of different prompt and answer lengths, so rows hold different numbers of pairs."""
    pairs = [PreferencePair((Message("user", "Tom has 3 apples. " * (1 + i % 3) + f"How many? {i}"),),
                            (Message("assistant", str(i)),),
                            (Message("assistant", f"{i + 2} apples, I am fine thank you" * (1 + i % 2)),))
             for i in range(PAIRS)]
    items, _ = tokenize_records(pairs, tokenizer, "auto", 96, "error", "pairs")
    return items


def by_example_id(batch, values):
    """{example id: value} for per-answer values laid out as [chosen_1..chosen_P, rejected_1..rejected_P]."""
    return dict(zip(batch["example_ids"].tolist(), values.tolist()))


def test_packed_pairs_give_the_log_probs_of_separate_sequences():
    model, tokenizer = tiny_chat_model_and_tokenizer()
    items = varied_pairs(tokenizer)
    units = list(range(PAIRS))
    separate = PreferencePlan(items, PAIRS, 0, 0, shuffle=False).collate(units)  # 2P rows, one answer each
    packed = PreferencePlan(items, PAIRS, 0, 0, shuffle=False, share_prompt=True, pack_to=ROW_TOKENS).collate(units)
    assert packed["input_ids"].shape[0] < PAIRS  # rows hold several pairs
    assert packed["input_ids"].shape[1] <= ROW_TOKENS
    assert sorted(packed["example_ids"].tolist()) == sorted(separate["example_ids"].tolist())
    with torch.no_grad():
        expected_sums, expected_counts = pair_logprobs(model, separate)
        sums, counts = pair_logprobs(model, packed, chunk_size=7)
    assert by_example_id(packed, counts) == by_example_id(separate, expected_counts)
    expected = by_example_id(separate, expected_sums)
    for example_id, value in by_example_id(packed, sums).items():
        assert value == pytest.approx(expected[example_id], abs=1e-5)


def test_packed_pairs_give_the_dpo_loss_and_gradients_of_separate_sequences():
    """In float64 weights: float32 sums in different orders over the packed and separate layouts
    differ by up to 5e-4 of the largest gradient here, which would hide a real difference."""
    model, tokenizer = tiny_chat_model_and_tokenizer()
    add_adapter(model, LoraConfig(r=4), "default")
    perturb_trainable(model, scale=0.3)  # policy != reference: the loss has a gradient
    model.double()
    items = varied_pairs(tokenizer)
    training = parse_train_config({"training": {"objective": "dpo"}}).training
    objective = PairwiseObjective("dpo", training, Reference("adapter_off", "default", cache=False))
    results = []
    for options in ({}, {"share_prompt": True, "pack_to": ROW_TOKENS}):
        batch = PreferencePlan(items, PAIRS, 0, 0, shuffle=False, mask_dtype=torch.float64,
                               **options).collate(list(range(PAIRS)))
        model.zero_grad()
        loss, metrics = objective.loss_sum(model, batch)
        loss.backward()
        grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
        results.append((float(loss.detach()), metrics, grads))
    (separate_loss, separate_metrics, separate_grads), (packed_loss, packed_metrics, packed_grads) = results
    assert packed_loss == pytest.approx(separate_loss, abs=1e-5)
    assert packed_metrics == pytest.approx(separate_metrics, abs=1e-5)
    for expected, got in zip(separate_grads, packed_grads):
        assert torch.allclose(got, expected, atol=1e-5)
    assert any(g.abs().sum() > 0 for g in packed_grads)


def test_eval_loss_shares_the_policy_forward_and_gives_the_training_loss_and_metrics():
    """eval_loss_sum takes the loss and the KL from one policy forward; its loss and reward metrics must
    be loss_sum's, in both pair layouts."""
    model, tokenizer = tiny_chat_model_and_tokenizer()
    add_adapter(model, LoraConfig(r=4), "default")
    perturb_trainable(model, scale=0.3)
    items = varied_pairs(tokenizer)
    training = parse_train_config({"training": {"objective": "dpo"}}).training
    objective = PairwiseObjective("dpo", training, Reference("adapter_off", "default", cache=False))
    for options in ({}, {"share_prompt": True, "pack_to": ROW_TOKENS}):
        batch = PreferencePlan(items, PAIRS, 0, 0, shuffle=False, **options).collate(list(range(PAIRS)))
        with torch.no_grad():
            loss, metrics = objective.loss_sum(model, batch)
            eval_loss, eval_metrics = objective.eval_loss_sum(model, batch)
        assert float(eval_loss) == pytest.approx(float(loss), abs=1e-5)
        assert {k: v for k, v in eval_metrics.items() if k != "kl"} == pytest.approx(metrics, abs=1e-5)
        assert eval_metrics["kl"] > 1e-4  # the perturbed adapter moved the policy from the reference


def test_data_packing_packs_pairs_in_training_with_the_same_losses(tmp_path, one_torch_thread):
    path = tmp_path / "pairs.jsonl"
    with path.open("w") as f:
        for i in range(8):
            f.write(json.dumps({"prompt": f"Tom has {i} apples. How many?", "chosen": str(i),
                                "rejected": f"{i + 3} apples"}) + "\n")
    losses = []
    for packing in (False, True):
        config = parse_train_config({
            "output_dir": str(tmp_path / f"packing_{packing}"), "adapter": {"r": 4},
            "data": {"train": str(path), "max_seq_len": 96, "packing": packing, "eval_size": 0},
            "training": {"objective": "dpo", "max_steps": 2, "batch_size": 4, "lr": 2e-2, "log_every": 1,
                         "warmup_steps": 0, "scheduler": "constant", "seed": 0}})
        run = train(config, model_and_tokenizer=tiny_chat_model_and_tokenizer())
        lines = [json.loads(line) for line in (run.run_dir / "metrics.jsonl").read_text().splitlines()]
        losses.append([line["train_loss"] for line in lines if "train_loss" in line])
    assert len(losses[0]) == 2
    assert losses[1] == pytest.approx(losses[0], abs=1e-5)
