"""GRPO inside the training loop: each micro-batch of prompts is sampled G times with the current
adapter (by tuneforge's serving engine, grpo_sampling.py), scored by a verifiable reward, and turned
into the clipped, KL-regularised loss of grpo.py.

One gradient step per generation (the paper's iteration count of 1), so pi_old is the policy that
sampled: the ratio is 1 in value while its gradient is the policy gradient. The reference is the
adapter-off base (or the starting adapter), as for DPO.
"""

from __future__ import annotations

import logging
import statistics

import torch
from torch import nn

from tuneforge.config.schema import TrainConfig
from tuneforge.data import load_examples
from tuneforge.data.collate import collate_padded
from tuneforge.data.datasets import dataset_names
from tuneforge.data.loading import _apply_bad_record_policy
from tuneforge.data.preference import PreferencePlan
from tuneforge.data.tokenization import IGNORE_INDEX, TokenizedExample, encode_prompt
from tuneforge.errors import DataError
from tuneforge.eval.generation import gold_answer, left_pad
from tuneforge.train.data_setup import PreparedData, eval_source
from tuneforge.train.objectives.grpo import group_advantages, grpo_loss
from tuneforge.train.objectives.grpo_sampling import PolicySampler
from tuneforge.train.objectives.logprobs import token_logprobs
from tuneforge.train.objectives.reference import Reference
from tuneforge.train.objectives.rewards import resolve_reward, safe_rewards

logger = logging.getLogger(__name__)


class GrpoObjective:
    name = "grpo"

    def __init__(self, config: TrainConfig, tokenizer, reference: Reference):
        self.training = config.training
        self.tokenizer = tokenizer
        self.reference = reference
        self.beta = self.training.beta if self.training.beta is not None else 0.04
        self.group_size = self.training.grpo_group_size
        self.reward_fn = resolve_reward(self.training.grpo_reward)
        self.failures_reported = False
        self.sampler = PolicySampler(tokenizer, reference.policy_adapter, config.data.template,
                                     self.training.grpo_max_new_tokens, self.training.grpo_temperature)

    def units(self, batch):
        return int(batch["input_ids"].shape[0])  # prompts

    def loss_sum(self, model, batch):
        prompts = _unpadded(batch)
        answers = _decode_answers(batch)
        completions = self.sample(model, prompts, greedy=False)
        rewards, failed = self.score(completions, [a for a in answers for _ in range(self.group_size)])
        sequences = _sequences([p for p in prompts for _ in range(self.group_size)], completions)
        logprobs, mask = token_logprobs(model, sequences, self.training.loss_chunk_size)
        reference = self.reference.uncached_logprobs(model, sequences, lambda m, b: token_logprobs(m, b, self.training.loss_chunk_size)[0])
        advantages = group_advantages(rewards.to(logprobs.device), self.group_size)
        losses, kl = grpo_loss(logprobs, logprobs.detach(), reference, mask.float(), advantages,
                               self.training.grpo_clip_epsilon, self.beta)
        group_mean = losses.view(-1, self.group_size).mean(dim=1)  # 1/G sum over the group: one value per prompt
        return group_mean.sum(), {"reward": float(rewards.view(-1, self.group_size).mean(dim=1).sum()),
                                  "kl": float(kl.detach().view(-1, self.group_size).mean(dim=1).sum()),
                                  "reward_failures": float(failed)}

    def sample(self, model: nn.Module, prompts: list[list[int]], greedy: bool) -> list[list[int]]:
        """G completions per prompt (one when greedy), each ending with its stop token if it stopped."""
        return self.sampler.sample(model, prompts, 1 if greedy else self.group_size, greedy)

    def score(self, completions: list[list[int]], answers: list[str]) -> tuple[torch.Tensor, int]:
        texts = [self.tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in completions]
        values, failed = safe_rewards(self.reward_fn, texts, answers)
        if failed and not self.failures_reported:
            logger.warning("training.grpo_reward=%s failed (raised, or returned NaN/inf/non-number) on %d of %d "
                           "completions; those get their group's mean reward (no push either way) and are counted in "
                           "reward_failures", self.training.grpo_reward, failed, len(texts))
            self.failures_reported = True
        return torch.tensor(_fill_failures(values, self.group_size), dtype=torch.float32), failed

    def evaluate(self, model, batches, device):
        """Mean greedy reward on held-out prompts; eval_loss is its negative (lower is better, as for early stopping)."""
        total, count = 0.0, 0
        for batch in batches:
            answers = _decode_answers(batch)
            completions = self.sample(model, _unpadded(batch), greedy=True)
            texts = [self.tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in completions]
            values, _ = safe_rewards(self.reward_fn, texts, answers)
            total += sum(v or 0.0 for v in values)
            count += len(values)
        mean = total / max(count, 1)
        return -mean, {"eval_reward": mean}


def _fill_failures(values: list[float | None], group_size: int) -> list[float]:
    filled = []
    for start in range(0, len(values), group_size):
        group = values[start:start + group_size]
        valid = [v for v in group if v is not None]
        fallback = statistics.fmean(valid) if valid else 0.0
        filled.extend(v if v is not None else fallback for v in group)
    return filled


def _unpadded(batch: dict[str, torch.Tensor]) -> list[list[int]]:
    return [ids[mask.bool()].tolist() for ids, mask in zip(batch["input_ids"].cpu(), batch["attention_mask"].cpu())]


def _decode_answers(batch: dict[str, torch.Tensor]) -> list[str]:
    """Gold answers travel in the batch as zero-padded UTF-8 bytes, so the batch stays all tensors."""
    return [bytes(row[row > 0].tolist()).decode("utf-8") for row in batch["answer_bytes"].cpu()]


def _sequences(prompts: list[list[int]], completions: list[list[int]]) -> dict[str, torch.Tensor]:
    examples = [TokenizedExample(p + c, [IGNORE_INDEX] * len(p) + c) for p, c in zip(prompts, completions)]
    return collate_padded(examples)


# ---------------------------------------------------------------- data: prompts with gold answers

class PromptPlan(PreferencePlan):
    """Batches of (prompt ids, gold answer): left-padded prompts and the answers as bytes."""

    def __init__(self, items, batch_size: int, seed: int, pad_id: int, shuffle: bool = True):
        super().__init__(items, batch_size, seed, pad_id, shuffle)
        self.unit_lengths = [len(ids) for ids, _ in self.items]

    def collate(self, units: list[int]) -> dict[str, torch.Tensor]:
        prompts = [self.items[u][0] for u in units]
        input_ids, attention_mask = left_pad(prompts, self.pad_id)
        encoded = [self.items[u][1].encode("utf-8") for u in units]
        answer_bytes = torch.zeros(len(units), max(len(e) for e in encoded) or 1, dtype=torch.long)
        for row, raw in enumerate(encoded):
            answer_bytes[row, :len(raw)] = torch.tensor(list(raw), dtype=torch.long)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "answer_bytes": answer_bytes}


def prepare_prompt_data(config: TrainConfig, tokenizer) -> PreparedData:
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    train_items, skipped = _prompt_items(config, tokenizer, config.data.train, "train")
    plan = PromptPlan(train_items, config.training.batch_size, config.training.seed, pad_id)
    eval_batches = []
    held_out = eval_source(config) if config.data.eval_size != 0 else None
    if held_out is not None:
        eval_items, _ = _prompt_items(config, tokenizer, *held_out)
        eval_items = eval_items[: config.data.eval_size] if config.data.eval_size else eval_items
        eval_batches = list(PromptPlan(eval_items, config.training.eval_batch_size, 0, pad_id, shuffle=False).batches(0))
    return PreparedData(plan, eval_batches, [], len(train_items), skipped)


def _prompt_items(config: TrainConfig, tokenizer, source: str, split: str) -> tuple[list[tuple[list[int], str]], int]:
    """Prompts and gold answers from any SFT-format data (the final assistant turn is the answer)."""
    data = config.data
    options = dict(data.options) if source in dataset_names() else {}
    if split == "eval":
        options.pop("size", None)
    loaded = load_examples(source, format=data.format, on_bad_record=data.on_bad_record, split=split, **options)
    items, problems = [], []
    for example in loaded.examples:
        if not example.is_chat:
            problems.append(f"{example.origin}: a text record has no prompt and answer; GRPO needs a conversation "
                            "ending in the gold answer")
            continue
        prompt = encode_prompt(example.prompt_messages, tokenizer, data.template)
        if len(prompt) + config.training.grpo_max_new_tokens > data.max_seq_len:
            problems.append(f"{example.origin}: the prompt ({len(prompt)} tokens) plus grpo_max_new_tokens does not fit "
                            f"data.max_seq_len={data.max_seq_len}; raise it or shorten the prompt")
            continue
        items.append((prompt, gold_answer(example)))
    if problems:
        _apply_bad_record_policy(problems, data.on_bad_record, source)
    if not items:
        raise DataError(f"{source}: no usable GRPO prompts")
    return items, loaded.skipped + len(problems)
