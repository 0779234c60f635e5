"""The main job behind ``make demo``: finetune SmolLM2-135M with LoRA on a bundled task, before/after.

It runs offline on 2 CPU cores: measure exact-match accuracy on held-out problems, train a LoRA adapter
for a few minutes, measure again on the same problems, and show where the run's files are. The training
settings are ``DEMO_CONFIG`` (mirrored in ``examples/demo.yaml``).
"""

from __future__ import annotations

import argparse
import time

from rich.console import Console
from rich.table import Table

from tuneforge.config import apply_overrides, parse_train_config

# State tracking (3 boxes, 2-4 moves, answer "box N"): SmolLM2-135M-Instruct scores 0% exact match
# before (it explains instead of answering) and ~85% after 100 steps, about 4 minutes on 2 CPU cores.
# LoRA sits on the upper 16 of 30 layers: backward stops there, which makes a CPU step ~1.5x cheaper
# than all layers while the task is still learnt (measured: docs/benchmarks.md).
DEMO_CONFIG = {
    "model": "smollm2-135m",
    "output_dir": "runs/demo",
    "adapter": {"method": "lora", "r": 16, "alpha": 32, "target_modules": "all-linear",
                "layers_to_transform": list(range(14, 30))},
    "data": {"train": "state_tracking", "max_seq_len": 256, "packing": True, "eval_size": 32},
    "training": {"max_steps": 100, "batch_size": 2, "lr": 1.0e-3, "warmup_steps": 5, "scheduler": "cosine",
                 "log_every": 5, "eval_every": 50, "seed": 0},
}


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--eval-limit", type=int, default=64, help="held-out problems scored before and after")
    parser.add_argument("--output-dir", default=DEMO_CONFIG["output_dir"], help="run directory (replaced if it exists)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="train-config overrides, e.g. training.max_steps=20")


def run_demo(args) -> int:
    from tuneforge.data import load_examples
    from tuneforge.eval.generation import score_generation
    from tuneforge.models import load_model
    from tuneforge.train import train
    from tuneforge.train.report import print_summary

    console = Console()
    config = parse_train_config(apply_overrides(DEMO_CONFIG, [f"output_dir={args.output_dir}", *args.overrides]),
                                source="demo config")
    task = config.data.train
    console.rule(f"[bold]tuneforge demo: LoRA on {config.model}, task '{task}'")
    started = time.perf_counter()
    loaded = load_model(config.model, dtype=config.dtype)
    held_out = load_examples(task, split="eval").examples[: args.eval_limit]
    console.print(f"scoring the base model on {len(held_out)} held-out problems ...")
    before = score_generation(loaded.model, loaded.tokenizer, held_out, max_new_tokens=8)
    summary = train(config, overwrite=True, model_and_tokenizer=(loaded.model, loaded.tokenizer))
    print_summary(summary, console)
    console.print(f"scoring the finetuned model on the same {len(held_out)} problems ...")
    after = score_generation(loaded.model, loaded.tokenizer, held_out, max_new_tokens=8)
    _print_comparison(console, before, after, held_out)
    console.print(f"run directory: [bold]{summary.run_dir}[/]   loss curve: [bold]{summary.run_dir / 'loss_curve.png'}[/]")
    console.print(f"next: tuneforge eval --adapter {summary.adapter_dir} --data {task}   |   "
                  f"tuneforge chat --adapter {summary.adapter_dir}")
    console.print(f"demo finished in {time.perf_counter() - started:.0f} s")
    return 0


def _print_comparison(console: Console, before, after, examples) -> None:
    table = Table(title="held-out accuracy (greedy decoding)", title_justify="left")
    for column in ("model", "exact match", "contains answer", "problems"):
        table.add_column(column)
    table.add_row("base", f"{before.exact_match:.1%}", f"{before.contains:.1%}", str(before.n))
    table.add_row("base + LoRA", f"{after.exact_match:.1%}", f"{after.contains:.1%}", str(after.n))
    console.print(table)
    for (prompt, prediction, gold), example in zip(after.samples, examples):
        question = example.prompt_messages[-1].content
        console.print(f"  Q: {question}\n     model: {prediction!r}   gold: {gold!r}")
