"""DPO with LoRA: tuneforge against TRL's DPOTrainer with peft, same model, pairs and settings.

Both sides train the same base model with the same LoRA (r=16, alpha=32, all linear layers) on the
same preference pairs (built from the bundled arithmetic task: chosen = the right answer, rejected
= a wrong one; the model's chat template renders both), with beta=0.1, AdamW, the same learning
rate, pairs per step and number of steps. The reference is the base model on both sides (the
adapter disabled). Each side runs in its own child process so its peak memory (max RSS on CPU, max
allocated on CUDA) is its own.

    python bench/preference.py --model smollm2-135m              # the measurement (8 steps of 8 pairs)
    python bench/preference.py --model /path/to/tiny-model --steps 3 --pairs-per-step 2   # smoke

Pairs/s is counted over steps 2..N on both sides (step 1 holds allocator warm-up).
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

LORA = dict(r=16, alpha=32, target_modules="all-linear")
BETA = 0.1
LEARNING_RATE = 5e-5


def build_model(name: str):
    from tuneforge.models import load_model

    loaded = load_model(name, dtype="float32")
    return loaded.model, loaded.tokenizer


def peak_memory_mb(device: str) -> float:
    import torch

    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def pairs_per_second(stamps: list[float], pairs_per_step: int) -> tuple[float, float]:
    seconds = stamps[-1] - stamps[0]
    return pairs_per_step * (len(stamps) - 1) / seconds, seconds


def run_tuneforge(args) -> dict:
    from tuneforge.config import parse_train_config
    from tuneforge.train import train

    model, tokenizer = build_model(args.model)
    config = parse_train_config({
        "output_dir": str(Path(args.workdir) / "tuneforge"), "device": args.device,
        "adapter": {"method": "lora", **LORA},
        "data": {"train": "arithmetic", "options": {"size": args.steps * args.pairs_per_step},
                 "max_seq_len": args.max_seq_len, "eval_size": 0},
        "training": {"objective": "dpo", "beta": BETA, "max_steps": args.steps, "batch_size": args.pairs_per_step,
                     "lr": LEARNING_RATE, "warmup_steps": 0, "scheduler": "constant", "max_grad_norm": 1.0,
                     "log_every": 1, "precision": args.precision},
    })
    stamps: list[float] = []
    train(config, overwrite=True, model_and_tokenizer=(model, tokenizer), on_step=lambda s, l: stamps.append(time.perf_counter()))
    rate, seconds = pairs_per_second(stamps, args.pairs_per_step)
    return {"pairs_per_second": rate, "peak_memory_mb": peak_memory_mb(args.device), "seconds": seconds, "steps": len(stamps)}


def trl_records(count: int) -> list[dict]:
    """The pairs tuneforge trains on, in TRL's conversational preference format."""
    from tuneforge.data.preference import load_preference_records

    pairs, _ = load_preference_records("arithmetic", "dpo", size=count)

    def messages(turns):
        return [{"role": m.role, "content": m.content} for m in turns]

    return [{"prompt": messages(p.prompt), "chosen": messages(p.chosen), "rejected": messages(p.rejected)} for p in pairs]


def run_trl(args) -> dict:
    import peft
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    model, tokenizer = build_model(args.model)
    stamps: list[float] = []

    class StepTimer(TrainerCallback):
        def on_step_end(self, a, state, control, **kw):
            stamps.append(time.perf_counter())

    dpo_args = DPOConfig(
        output_dir=str(Path(args.workdir) / "trl"), per_device_train_batch_size=args.pairs_per_step,
        max_steps=args.steps, learning_rate=LEARNING_RATE, lr_scheduler_type="constant", warmup_steps=0,
        max_grad_norm=1.0, beta=BETA, max_length=args.max_seq_len, logging_steps=1, save_strategy="no",
        report_to=[], disable_tqdm=True, use_cpu=args.device == "cpu", bf16=args.precision == "bf16",
        dataloader_num_workers=0, seed=0,
    )
    lora = peft.LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], target_modules=LORA["target_modules"])
    trainer = DPOTrainer(model=model, args=dpo_args, train_dataset=Dataset.from_list(trl_records(args.steps * args.pairs_per_step)),
                         processing_class=tokenizer, peft_config=lora, callbacks=[StepTimer()])
    trainer.train()
    rate, seconds = pairs_per_second(stamps, args.pairs_per_step)
    return {"pairs_per_second": rate, "peak_memory_mb": peak_memory_mb(args.device), "seconds": seconds, "steps": len(stamps)}


def run_child(side: str, args) -> dict:
    command = [sys.executable, __file__, "--child", side, "--model", args.model, "--steps", str(args.steps),
               "--pairs-per-step", str(args.pairs_per_step), "--max-seq-len", str(args.max_seq_len),
               "--device", args.device, "--precision", args.precision, "--workdir", args.workdir]
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        raise SystemExit(f"{side} failed:\n{done.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m", help="an embedded model name or a local HF directory")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--pairs-per-step", type=int, default=8)
    parser.add_argument("--max-seq-len", type=int, default=256)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--workdir", default="/tmp/tuneforge-bench-preference")
    parser.add_argument("--child", choices=["tuneforge", "trl"])
    parser.add_argument("--output", help="also write the results as JSON here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict | None:
    args = parse_args(argv)
    if args.child:
        import torch

        torch.manual_seed(0)
        result = run_tuneforge(args) if args.child == "tuneforge" else run_trl(args)
        print("RESULT " + json.dumps(result), flush=True)
        return None
    ours, peer = run_child("tuneforge", args), run_child("trl", args)
    row = {"model": args.model, "tuneforge": ours, "trl": peer,
           "speedup": ours["pairs_per_second"] / peer["pairs_per_second"],
           "memory_ratio": ours["peak_memory_mb"] / peer["peak_memory_mb"]}
    print("\n| model | tuneforge pairs/s | TRL pairs/s | speed ratio | tuneforge peak MiB | TRL peak MiB | memory ratio |")
    print("|---|---|---|---|---|---|---|")
    print(f"| {args.model} | {ours['pairs_per_second']:.2f} | {peer['pairs_per_second']:.2f} | {row['speedup']:.2f}x | "
          f"{ours['peak_memory_mb']:.0f} | {peer['peak_memory_mb']:.0f} | {row['memory_ratio']:.2f}x |")
    if args.output:
        Path(args.output).write_text(json.dumps(row, indent=2))
    return row


if __name__ == "__main__":
    main()
