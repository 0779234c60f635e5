"""Training throughput and peak memory: tuneforge vs transformers Trainer + peft, same work.

Both sides train the same base model (smollm2-135m, and a ~0.5B random-initialised Llama config) with
the same LoRA config (r=16, alpha=32, all linear layers), the same data (the bundled arithmetic task,
same examples, SmolLM2's chat template, loss on answers only), the same optimizer, learning rate,
batch size (in examples per step) and number of steps. Each side runs in its own child process so
that its peak memory (max RSS on CPU, max allocated on CUDA) is its own; the parent reports ratios.

    python bench/train_throughput.py                 # both models, 6 steps each
    python bench/train_throughput.py --models smollm2-135m --steps 4 --examples-per-step 16

Tokens/s counts the real (unpadded) tokens of the examples processed, identically for both sides.
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


def run_tuneforge(args) -> dict:
    from tuneforge.config import parse_train_config
    from tuneforge.train import train

    model, tokenizer = build_model(args.model)
    tokenized = training_examples(tokenizer, args.steps * args.examples_per_step, args.max_seq_len)
    tokens = sum(len(t) for t in tokenized)
    # Packed rows of max_seq_len hold ~examples_per_step examples per step in total.
    mean_len = tokens / len(tokenized)
    rows_per_step = max(1, round(args.examples_per_step * mean_len / args.max_seq_len))
    config = parse_train_config({
        "output_dir": str(Path(args.workdir) / "tuneforge"), "device": args.device,
        "adapter": {"method": "lora", "r": 16, "alpha": 32, "target_modules": "all-linear"},
        "data": {"train": "arithmetic", "options": {"size": len(tokenized)}, "max_seq_len": args.max_seq_len, "packing": True,
                 "eval_size": 0},
        "training": {"max_steps": args.steps, "batch_size": rows_per_step, "lr": 1e-4, "warmup_steps": 0,
                     "scheduler": "constant", "max_grad_norm": 1.0, "log_every": 1, "precision": args.precision},
    })
    summary = train(config, overwrite=True, model_and_tokenizer=(model, tokenizer))
    return {"tokens_per_second": summary.tokens_per_second, "peak_memory_mb": peak_memory_mb(args.device),
            "seconds": summary.train_seconds, "steps": summary.steps}


def run_peer(args) -> dict:
    import peft
    import torch
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainerCallback, TrainingArguments

    model, tokenizer = build_model(args.model)
    tokenized = training_examples(tokenizer, args.steps * args.examples_per_step, args.max_seq_len)
    records = [{"input_ids": t.input_ids, "labels": t.labels, "attention_mask": [1] * len(t)} for t in tokenized]
    model = peft.get_peft_model(model, peft.LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
    timer = {}

    class StepTimer(TrainerCallback):  # time only the steps, as tuneforge's summary does
        def on_step_begin(self, a, state, control, **kw):
            timer.setdefault("start", time.perf_counter())

        def on_train_end(self, a, state, control, **kw):
            timer["end"] = time.perf_counter()

    training_args = TrainingArguments(
        output_dir=str(Path(args.workdir) / "peer"), per_device_train_batch_size=args.examples_per_step,
        max_steps=args.steps, learning_rate=1e-4, lr_scheduler_type="constant", warmup_steps=0,
        max_grad_norm=1.0, logging_steps=1, save_strategy="no", report_to=[], disable_tqdm=True,
        use_cpu=args.device == "cpu", bf16=args.precision == "bf16", dataloader_num_workers=0, seed=0,
    )
    trainer = Trainer(model=model, args=training_args, train_dataset=records,
                      data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100),
                      callbacks=[StepTimer()])
    trainer.train()
    seconds = timer["end"] - timer["start"]
    tokens = sum(len(r["input_ids"]) for r in records[: args.steps * args.examples_per_step])
    return {"tokens_per_second": tokens / seconds, "peak_memory_mb": peak_memory_mb(args.device),
            "seconds": seconds, "steps": args.steps}


def child_main(args) -> None:
    import torch

    torch.manual_seed(0)
    result = run_tuneforge(args) if args.side == "tuneforge" else run_peer(args)
    print("RESULT " + json.dumps(result), flush=True)


def run_child(side: str, model: str, args) -> dict:
    command = [sys.executable, __file__, "--child", side, "--models", model, "--steps", str(args.steps),
               "--examples-per-step", str(args.examples_per_step), "--max-seq-len", str(args.max_seq_len),
               "--device", args.device, "--precision", args.precision, "--workdir", args.workdir]
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        raise SystemExit(f"{side} on {model} failed:\n{done.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="smollm2-135m,llama-0.5b-random")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--examples-per-step", type=int, default=16)
    parser.add_argument("--max-seq-len", type=int, default=256)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--workdir", default="/tmp/tuneforge-bench")
    parser.add_argument("--child", choices=["tuneforge", "peer"])
    parser.add_argument("--output", help="also write the results as JSON here")
    args = parser.parse_args()
    if args.child:
        args.side, args.model = args.child, args.models
        child_main(args)
        return
    rows = []
    for model in args.models.split(","):
        ours = run_child("tuneforge", model, args)
        theirs = run_child("peer", model, args)
        rows.append({"model": model, "tuneforge": ours, "peer": theirs,
                     "speedup": ours["tokens_per_second"] / theirs["tokens_per_second"],
                     "memory_ratio": ours["peak_memory_mb"] / theirs["peak_memory_mb"]})
    print(f"\n| model | tuneforge tok/s | peer tok/s | speed ratio | tuneforge peak MiB | peer peak MiB | memory ratio |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['tuneforge']['tokens_per_second']:.1f} | {r['peer']['tokens_per_second']:.1f} | "
              f"{r['speedup']:.2f}x | {r['tuneforge']['peak_memory_mb']:.0f} | {r['peer']['peak_memory_mb']:.0f} | "
              f"{r['memory_ratio']:.2f}x |")
    if args.output:
        Path(args.output).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
