"""Training throughput and peak memory: tuneforge vs transformers Trainer + peft, same work.

Both sides train the same base model (smollm2-135m, and a ~0.5B random-initialised Llama config) with
the same LoRA config (r=16, alpha=32, all linear layers), the same data (the bundled arithmetic task,
same examples, SmolLM2's chat template, loss on answers only), the same optimizer, learning rate,
batch size (in examples per step) and number of steps. Each side runs in its own child process so
that its peak memory (max RSS on CPU, max allocated on CUDA) is its own; the parent reports ratios.

    python bench/train_throughput.py                 # both models, 8 steps each (step 1 not timed)
    python bench/train_throughput.py --models smollm2-135m --steps 4 --examples-per-step 16
    python bench/train_throughput.py --max-seq-len 128 --no-share-prefix   # tuneforge's packing of before

The peer pads each batch of --examples-per-step examples to its longest. tuneforge packs the examples
into rows of --max-seq-len tokens (as `tuneforge train` does by default), holding the system prompt
that all of them open with once per row (data.share_prefix), and takes as many rows per step as hold
about --examples-per-step examples.

Tokens/s counts the real (unpadded) tokens of the examples processed, identically for both sides (a
shared prefix counts once per example, as if it had been computed for each), over steps 2..N (step 1
holds allocator warm-up and, for the compiled run, the ~1 minute compilation).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

RANDOM_05B = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                  num_key_value_heads=8, vocab_size=49152, max_position_embeddings=2048, tie_word_embeddings=True)


def build_model(name: str):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from tuneforge.models import load_model, load_tokenizer

    if name == "llama-0.5b-random":
        torch.manual_seed(0)
        return LlamaForCausalLM(LlamaConfig(**RANDOM_05B)), load_tokenizer("smollm2-135m")
    loaded = load_model(name)
    return loaded.model, loaded.tokenizer


def training_examples(tokenizer, count: int, max_seq_len: int):
    from tuneforge.data import get_dataset, tokenize_examples

    examples = get_dataset("arithmetic", split="train", size=count)
    return tokenize_examples(examples, tokenizer, max_seq_len=max_seq_len)


def peak_memory_mb(device: str) -> float:
    import torch

    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def steady_rate(timestamps: list[float], tokens: list[int]) -> tuple[float, float]:
    """(tokens/s, seconds) over steps 2..N: step 1 (allocator warm-up, compilation) is excluded for both sides."""
    seconds = timestamps[-1] - timestamps[0]
    return sum(tokens[1:]) / seconds, seconds


def packed_rows_per_step(tokenized, args) -> int:
    """Packed rows holding about --examples-per-step examples, the peer's batch: measured on the
    packing tuneforge will do (a shared system prompt lets more examples into a row)."""
    from tuneforge.data import BatchPlan

    plan = BatchPlan(tokenized, 1, packing=True, max_seq_len=args.max_seq_len, share_prefix=not args.no_share_prefix)
    examples_per_row = len(tokenized) / len(plan.rows)
    return max(1, round(args.examples_per_step / examples_per_row))


def run_tuneforge(args, compile_layers: bool) -> dict:
    from tuneforge.config import parse_train_config
    from tuneforge.train import train
    from tuneforge.train.metrics import read_metrics

    model, tokenizer = build_model(args.model)
    tokenized = training_examples(tokenizer, args.steps * args.examples_per_step, args.max_seq_len)
    rows_per_step = packed_rows_per_step(tokenized, args)
    run_dir = Path(args.workdir) / ("tuneforge-compiled" if compile_layers else "tuneforge")
    config = parse_train_config({
        "output_dir": str(run_dir), "device": args.device,
        "adapter": {"method": "lora", "r": 16, "alpha": 32, "target_modules": "all-linear"},
        "data": {"train": "arithmetic", "options": {"size": len(tokenized)}, "max_seq_len": args.max_seq_len,
                 "packing": True, "share_prefix": not args.no_share_prefix, "eval_size": 0},
        "training": {"max_steps": args.steps, "batch_size": rows_per_step, "lr": 1e-4, "warmup_steps": 0,
                     "scheduler": "constant", "max_grad_norm": 1.0, "log_every": 1, "precision": args.precision,
                     "compile": compile_layers},
    })
    stamps = []
    train(config, overwrite=True, model_and_tokenizer=(model, tokenizer), on_step=lambda s, l: stamps.append(time.perf_counter()))
    seen = [r["tokens_seen"] for r in read_metrics(run_dir / "metrics.jsonl") if "tokens_seen" in r]
    per_step = [seen[0]] + [b - a for a, b in zip(seen, seen[1:])]
    rate, seconds = steady_rate(stamps, per_step)
    return {"tokens_per_second": rate, "peak_memory_mb": peak_memory_mb(args.device), "seconds": seconds, "steps": len(stamps)}


def run_peer(args) -> dict:
    import peft
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainerCallback, TrainingArguments

    model, tokenizer = build_model(args.model)
    tokenized = training_examples(tokenizer, args.steps * args.examples_per_step, args.max_seq_len)
    records = [{"input_ids": t.input_ids, "labels": t.labels, "attention_mask": [1] * len(t)} for t in tokenized]
    model = peft.get_peft_model(model, peft.LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
    collate = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)
    batch_tokens, stamps = [], []

    def counting_collator(features):  # real (unpadded) tokens of each batch, as tuneforge counts them
        batch_tokens.append(sum(len(f["input_ids"]) for f in features))
        return collate(features)

    class StepTimer(TrainerCallback):
        def on_step_end(self, a, state, control, **kw):
            stamps.append(time.perf_counter())

    training_args = TrainingArguments(
        output_dir=str(Path(args.workdir) / "peer"), per_device_train_batch_size=args.examples_per_step,
        max_steps=args.steps, learning_rate=1e-4, lr_scheduler_type="constant", warmup_steps=0,
        max_grad_norm=1.0, logging_steps=1, save_strategy="no", report_to=[], disable_tqdm=True,
        use_cpu=args.device == "cpu", bf16=args.precision == "bf16", dataloader_num_workers=0, seed=0,
    )
    Trainer(model=model, args=training_args, train_dataset=records, data_collator=counting_collator,
            callbacks=[StepTimer()]).train()
    rate, seconds = steady_rate(stamps, batch_tokens[: len(stamps)])
    return {"tokens_per_second": rate, "peak_memory_mb": peak_memory_mb(args.device), "seconds": seconds, "steps": len(stamps)}


def child_main(args) -> None:
    import torch

    torch.manual_seed(0)
    if args.side == "peer":
        result = run_peer(args)
    else:
        result = run_tuneforge(args, compile_layers=args.side == "tuneforge-compiled")
    print("RESULT " + json.dumps(result), flush=True)


def run_child(side: str, model: str, args) -> dict:
    command = [sys.executable, __file__, "--child", side, "--models", model, "--steps", str(args.steps),
               "--examples-per-step", str(args.examples_per_step), "--max-seq-len", str(args.max_seq_len),
               "--device", args.device, "--precision", args.precision, "--workdir", args.workdir]
    if args.no_share_prefix:
        command.append("--no-share-prefix")
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        raise SystemExit(f"{side} on {model} failed:\n{done.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="smollm2-135m,llama-0.5b-random")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--examples-per-step", type=int, default=16)
    parser.add_argument("--max-seq-len", type=int, default=256,
                        help="truncation length on both sides, and the length of tuneforge's packed rows (default 256)")
    parser.add_argument("--no-share-prefix", action="store_true",
                        help="tuneforge packs without holding the shared system prompt once per row")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--workdir", default="/tmp/tuneforge-bench")
    parser.add_argument("--child", choices=["tuneforge", "tuneforge-compiled", "peer"])
    parser.add_argument("--no-compile", action="store_true", help="skip the compiled tuneforge run")
    parser.add_argument("--output", help="also write the results as JSON here")
    args = parser.parse_args()
    if args.child:
        args.side, args.model = args.child, args.models
        child_main(args)
        return
    rows = []
    for model in args.models.split(","):
        results = {"tuneforge": run_child("tuneforge", model, args)}
        if not args.no_compile:
            results["tuneforge-compiled"] = run_child("tuneforge-compiled", model, args)
        peer = run_child("peer", model, args)
        for side, ours in results.items():
            rows.append({"model": model, "side": side, "tuneforge": ours, "peer": peer,
                         "speedup": ours["tokens_per_second"] / peer["tokens_per_second"],
                         "memory_ratio": ours["peak_memory_mb"] / peer["peak_memory_mb"]})
    print("\n| model | tuneforge | tuneforge tok/s | peer tok/s | speed ratio | tuneforge peak MiB | peer peak MiB | memory ratio |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['side']} | {r['tuneforge']['tokens_per_second']:.1f} | {r['peer']['tokens_per_second']:.1f} | "
              f"{r['speedup']:.2f}x | {r['tuneforge']['peak_memory_mb']:.0f} | {r['peer']['peak_memory_mb']:.0f} | "
              f"{r['memory_ratio']:.2f}x |")
    if args.output:
        Path(args.output).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
