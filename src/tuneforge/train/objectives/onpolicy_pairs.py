"""On-policy preference pairs: the policy's own mistakes as the rejected answers.

One iteration of DNO-Prct, the practical algorithm of Rosset et al. 2024, "Direct Nash Optimization:
Teaching Language Models to Self-Improve with General Preferences" (Algorithm 2): for each prompt,
sample K answers from the current policy pi_t, let a preference oracle rank them together with the
teacher's (gold) answer, keep only large-margin pairs, and train pi_{t+1} with the DPO-style
contrastive loss, pi_t as the reference. Here the oracle is a verifiable reward (exact match against
the gold answer, or any GRPO reward), the teacher's answer is the gold one, and the large-margin pairs
are (gold, sampled answer with reward 0): chosen is always right, rejected is a mistake the policy
actually makes, which a task-derived pair (a random nearby number) seldom is.

    tuneforge pairs --adapter runs/sft-arithmetic/adapter --data arithmetic --samples 4 \
        --out runs/sft-arithmetic/onpolicy_pairs.jsonl
    tuneforge train examples/dpo_onpolicy_arithmetic.yaml      # data.train: that file; reference: init_adapter

Further DNO iterations repeat both commands from the new adapter.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tuneforge.data import Example
from tuneforge.data.tokenization import encode_prompt
from tuneforge.errors import ConfigError
from tuneforge.eval.generation import gold_answer
from tuneforge.fileio import atomic_write
from tuneforge.train.objectives.grpo_sampling import PolicySampler
from tuneforge.train.objectives.rewards import resolve_reward, safe_rewards

POLICY_ADAPTER = "default"


@dataclass
class PairStats:
    prompts: int = 0
    samples: int = 0
    correct_samples: int = 0
    pairs: int = 0
    reward_failures: int = 0

    @property
    def sample_accuracy(self) -> float:
        return self.correct_samples / self.samples if self.samples else 0.0


def onpolicy_pairs(model, tokenizer, examples: Sequence[Example], *, samples: int = 4, temperature: float = 1.0,
                   max_new_tokens: int = 16, reward: str = "exact_match", template: str = "auto",
                   pairs_per_prompt: int = 1, prompts_per_batch: int = 16, progress=None) -> tuple[list[dict], PairStats]:
    """Preference records ``{prompt, chosen, rejected}`` (message lists) and counts. ``model`` carries the
    policy as adapter ``default`` (or none: the base model). Per prompt, up to ``pairs_per_prompt`` pairs
    of (gold answer, a distinct sampled answer whose reward is below the gold's)."""
    if samples < 1 or pairs_per_prompt < 1:
        raise ConfigError(f"samples={samples} and pairs_per_prompt={pairs_per_prompt} must be at least 1")
    reward_fn = resolve_reward(reward)
    sampler = PolicySampler(tokenizer, POLICY_ADAPTER, template, max_new_tokens, temperature)
    records, stats = [], PairStats()
    for start in range(0, len(examples), prompts_per_batch):
        batch = list(examples[start:start + prompts_per_batch])
        prompts = [encode_prompt(e.prompt_messages, tokenizer, template) for e in batch]
        completions = sampler.sample(model, prompts, samples, greedy=False)
        texts = [tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in completions]
        golds = [gold_answer(e) for e in batch]
        values, failed = safe_rewards(reward_fn, texts, [g for g in golds for _ in range(samples)])
        gold_values, _ = safe_rewards(reward_fn, golds, golds)
        stats.reward_failures += failed
        for i, example in enumerate(batch):
            mine = list(zip(texts[i * samples:(i + 1) * samples], values[i * samples:(i + 1) * samples]))
            records.extend(_pairs_of(example, golds[i], gold_values[i], mine, pairs_per_prompt))
            stats.correct_samples += sum(1 for _, v in mine if v is not None and gold_values[i] is not None and v >= gold_values[i])
        stats.prompts += len(batch)
        stats.samples += len(batch) * samples
        stats.pairs = len(records)
        if progress is not None:
            progress(stats)
    return records, stats


def _pairs_of(example: Example, gold: str, gold_value: float | None, sampled: list[tuple[str, float | None]],
              limit: int) -> list[dict]:
    """Large-margin pairs only: the gold answer against distinct, non-empty samples it out-scores."""
    if gold_value is None:
        return []
    prompt = [{"role": m.role, "content": m.content} for m in example.prompt_messages]
    rejected, seen = [], set()
    for text, value in sampled:
        if value is None or value >= gold_value or not text or text == gold or text in seen:
            continue
        seen.add(text)
        rejected.append(text)
    return [{"prompt": prompt, "chosen": [{"role": "assistant", "content": gold}],
             "rejected": [{"role": "assistant", "content": text}]} for text in rejected[:limit]]


# ---------------------------------------------------------------- the command


def add_pairs_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="smollm2-135m", help="base model (an embedded name, HF directory or .gguf)")
    parser.add_argument("--adapter", help="the policy's adapter directory (omitted: the base model is the policy)")
    parser.add_argument("--data", required=True, help="prompts with gold answers: a bundled task or a data file")
    parser.add_argument("--size", type=int, help="bundled task: how many training problems (default: the task's)")
    parser.add_argument("--limit", type=int, help="use at most this many prompts")
    parser.add_argument("--samples", type=int, default=4, help="answers sampled per prompt (K)")
    parser.add_argument("--pairs-per-prompt", type=int, default=1)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--reward", default="exact_match", help="a GRPO reward: exact_match, numeric, contains, "
                        "regex:PATTERN, format:PATTERN or module:function")
    parser.add_argument("--template", default="auto", help="chat template (default: the one the adapter's run used)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True, help="the JSONL file of pairs to write (atomically)")


def run_pairs(args: argparse.Namespace) -> int:
    import torch
    from rich.console import Console

    from tuneforge.adapters.peft_format import load_adapter
    from tuneforge.data import load_examples
    from tuneforge.eval.command import run_template
    from tuneforge.models import load_model

    console = Console(stderr=True)
    out = Path(args.out)
    if not out.parent.is_dir():
        raise ConfigError(f"--out {out}: folder {out.parent} does not exist; create it first")
    options = {"size": args.size} if args.size else {}
    examples = load_examples(args.data, split="train", **options).examples[: args.limit]
    if not examples:
        raise ConfigError(f"--data {args.data}: no examples to sample from")
    template = args.template
    if template == "auto" and args.adapter:
        template = run_template(args.adapter) or "auto"
    torch.manual_seed(args.seed)
    loaded = load_model(args.model, dtype="float32")
    if args.adapter:
        load_adapter(loaded.model, args.adapter, POLICY_ADAPTER)
    say = lambda s: console.print(f"  {s.prompts}/{len(examples)} prompts, sample accuracy {s.sample_accuracy:.1%}, "  # noqa: E731
                                  f"{s.pairs} pairs", highlight=False)
    records, stats = onpolicy_pairs(loaded.model, loaded.tokenizer, examples, samples=args.samples,
                                    temperature=args.temperature, max_new_tokens=args.max_new_tokens,
                                    reward=args.reward, template=template, pairs_per_prompt=args.pairs_per_prompt,
                                    progress=say)
    if not records:
        raise ConfigError(f"no pairs: every sampled answer of {stats.prompts} prompts scored as well as the gold one; "
                          "raise --temperature or --samples, or the policy has nothing left to learn here")
    atomic_write(out, lambda tmp: tmp.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8"))
    console.print(f"wrote {len(records)} on-policy pairs to {out} ({stats.prompts} prompts x {args.samples} samples, "
                  f"policy sample accuracy {stats.sample_accuracy:.1%}, {stats.reward_failures} reward failures)",
                  highlight=False)
    return 0
