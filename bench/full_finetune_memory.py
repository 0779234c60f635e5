"""Full-parameter finetuning side by side: peak memory, optimizer state and step time per update rule.

Every method trains the same model on the same data (the bundled arithmetic task) for the same steps,
each in its own child process, so that each peak RSS (VmHWM, which includes loading the model) is its
own. Beside them run full AdamW fp32 (the baseline every ratio is taken against), one inference
forward pass (MeZO's yardstick), transformers' Trainer full finetuning with AdamW (the peer), and,
when galore-torch is installed, the Trainer's layer-wise GaLore (what LLaMA-Factory runs for
`use_galore: true, galore_layerwise: true`).

    python bench/full_finetune_memory.py --models tiny --steps 3            # smoke test, seconds
    python bench/full_finetune_memory.py --models smollm2-135m --steps 8    # the documented table
    python bench/full_finetune_memory.py --models llama-0.5b-random --methods adamw,galore-layerwise,lomo

Columns: peak RSS (MiB) and its ratio to full AdamW; optimizer-state bytes (tensors held in the
optimizer's state_dict after the last step, i.e. what a checkpoint holds and resuming needs); mean step time over steps 2..N;
the last training loss. tuneforge's peak is read after its last step, before the model it writes at the end (the peer saves nothing); the peak including that write is in the JSON
(``peak_rss_with_save_mib``).

Accuracy (``--accuracy``) is a separate mode, since it needs the demo's budget rather than a few
steps: every method trains on the demo's task and schedule (``state_tracking``, 100 steps of 2 packed
rows x 256 tokens, cosine after 5 warm-up steps), then greedy exact match on the first
``--eval-examples`` held-out problems, as the method comparison scores adapters:

    python bench/full_finetune_memory.py --accuracy --output /tmp/fft-accuracy.json   # ~9 min per method

With ``--output``, rows already in that file (same mode) are kept and not run again, so a stopped run
resumes where it was.

The learning rates and periods it uses are in ``ACCURACY_SETTINGS``: one AdamW learning rate for every
Adam-based rule; BAdam's and LISA's switching periods shortened so that 100 steps visit most layers (their
defaults assume thousands of steps); GaLore and APOLLO with scale 1 so that their steps are AdamW-sized;
LOMO's SGD and AdaLomo at their papers' learning rates; MeZO at its paper's lr and ε (it needs far more
steps, and the table says so).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

RANDOM_CONFIGS = {
    "llama-0.5b-random": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                              num_key_value_heads=8, vocab_size=49152, max_position_embeddings=2048,
                              tie_word_embeddings=True),
    "llama-1.1b-random": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                              num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048,
                              tie_word_embeddings=False),
}

# method -> (adapter.method full options, update_rule, training overrides)
METHODS = {
    "adamw": ({}, {"method": "optimizer"}, {}),
    "adamw8bit": ({}, {"method": "optimizer"}, {"optimizer": "adamw8bit"}),
    "galore": ({}, {"method": "galore", "rank": 128}, {}),
    "galore-layerwise": ({}, {"method": "galore", "rank": 128, "per_layer": True}, {"max_grad_norm": None}),
    "apollo": ({}, {"method": "apollo", "rank": 128}, {}),
    "apollo-mini": ({}, {"method": "apollo-mini"}, {}),
    "badam": ({}, {"method": "badam", "switch_every": 50}, {}),
    "lisa": ({}, {"method": "lisa", "active_layers": 2, "switch_every": 50}, {}),
    "lomo": ({}, {"method": "lomo"}, {}),
    "adalomo": ({}, {"method": "adalomo"}, {}),
    "mezo": ({}, {"method": "mezo"}, {}),
}
# method -> (learning rate, update_rule overrides) for --accuracy
ADAM_LR = 5e-5
ACCURACY_SETTINGS = {
    "adamw": (ADAM_LR, {}),
    "adamw8bit": (ADAM_LR, {}),
    "galore": (ADAM_LR, {"scale": 1.0}),
    "galore-layerwise": (ADAM_LR, {"scale": 1.0}),
    "apollo": (ADAM_LR, {"scale": 1.0}),
    "apollo-mini": (ADAM_LR, {}),  # Mini's own sqrt(128) scale: its rank-1 estimate needs it
    "badam": (ADAM_LR, {"switch_every": 4}),
    "lisa": (ADAM_LR, {"switch_every": 10}),
    "lomo": (1e-2, {}),  # plain SGD: Lv et al. train with lr 1e-2..3e-2
    "adalomo": (5e-4, {}),
    "mezo": (1e-6, {"eps": 1e-3}),  # Malladi et al.'s lr and epsilon
}
ACCURACY_TASK = "state_tracking"
ACCURACY_STEPS = 100
PEERS = ("inference", "peer-trainer-adamw", "peer-trainer-galore-layerwise")


def build_model(name: str):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from tuneforge.models import load_model, load_tokenizer

    if name == "tiny":
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        from tiny_models import tiny_chat_model_and_tokenizer

        return tiny_chat_model_and_tokenizer()
    if name in RANDOM_CONFIGS:
        torch.manual_seed(0)
        return LlamaForCausalLM(LlamaConfig(**RANDOM_CONFIGS[name])), load_tokenizer("smollm2-135m")
    loaded = load_model(name, dtype="float32")
    return loaded.model, loaded.tokenizer


def peak_rss_mib() -> float:
    """VmHWM: the process's peak resident set, in MiB (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_tuneforge(method: str, args) -> dict:
    import torch

    from tuneforge.config import parse_train_config
    from tuneforge.train import train
    from tuneforge.train.update_rules import build_update_rule

    adapter, rule, overrides = METHODS[method]
    model, tokenizer = build_model(args.model)
    run_dir = Path(args.workdir) / f"{args.model}-{method}"
    config = parse_train_config({
        "output_dir": str(run_dir), "device": args.device,
        "adapter": {"method": "full", **adapter}, "update_rule": rule,
        "data": {"train": "arithmetic", "options": {"size": args.steps * args.batch_size * 2},
                 "max_seq_len": args.max_seq_len, "eval_size": 0},
        "training": {"max_steps": args.steps, "batch_size": args.batch_size, "lr": args.lr, "warmup_steps": 0,
                     "scheduler": "constant", "log_every": 1, "precision": args.precision,
                     "cpu_memory": args.cpu_memory, **overrides},
    })  # save_every unset: one checkpoint, after the last step, so no save falls inside the training peak
    stamps, losses, peaks = [], [], []

    def on_step(step, loss):
        stamps.append(time.perf_counter())
        losses.append(loss)
        peaks.append(peak_rss_mib())

    rules = []

    def keep_rule(model, config, full_finetune):
        rules.append(build_update_rule(model, config, full_finetune))
        return rules[-1]

    start = time.perf_counter()
    train(config, overwrite=True, model_and_tokenizer=(model, tokenizer), on_step=on_step, make_update_rule=keep_rule)
    # What a checkpoint would hold (and a resume needs): the optimizer's state_dict, read from the live rule.
    state = rules[-1].optimizer.state_dict()["state"]
    state_bytes = sum(t.numel() * t.element_size() for s in state.values() for t in s.values() if torch.is_tensor(t))
    # The peak as of the last step: what training needs, as the peer's (which saves nothing) is measured.
    # The final checkpoint and model write come after it and are reported apart.
    return {"peak_rss_mib": peaks[-1], "peak_rss_with_save_mib": peak_rss_mib(), "optimizer_state_bytes": state_bytes,
            "step_seconds": _mean_step(stamps, start), "final_loss": losses[-1]}


def run_accuracy(method: str, args) -> dict:
    """Train on the demo's task and budget, then greedy exact match on held-out problems."""
    from tuneforge.config import parse_train_config
    from tuneforge.data import load_examples
    from tuneforge.eval.generation import score_generation
    from tuneforge.train import train

    adapter, rule, overrides = METHODS[method]
    lr, rule_settings = ACCURACY_SETTINGS[method]
    model, tokenizer = build_model(args.model)
    config = parse_train_config({
        "output_dir": str(Path(args.workdir) / f"accuracy-{args.model}-{method}"), "device": args.device,
        "adapter": {"method": "full", **adapter}, "update_rule": {**rule, **rule_settings},
        "data": {"train": ACCURACY_TASK, "max_seq_len": 256, "packing": True, "eval_size": 0},
        "training": {"max_steps": args.steps, "batch_size": 2, "lr": lr, "warmup_steps": 5, "scheduler": "cosine",
                     "log_every": 1, "precision": args.precision, "save_every": args.steps, **overrides},
    })
    stamps, losses = [], []
    start = time.perf_counter()
    train(config, overwrite=True, model_and_tokenizer=(model, tokenizer),
          on_step=lambda step, loss: (stamps.append(time.perf_counter()), losses.append(loss)))
    held_out = load_examples(ACCURACY_TASK, split="eval").examples[: args.eval_examples]
    score = score_generation(model, tokenizer, held_out, max_new_tokens=8, progress=False)
    return {"lr": lr, "exact_match": score.exact_match, "peak_rss_mib": peak_rss_mib(),
            "step_seconds": _mean_step(stamps, start), "final_loss": losses[-1] if losses else None,
            "first_loss": losses[0] if losses else None}


def run_inference(args) -> dict:
    import torch

    from tuneforge.data import get_dataset, tokenize_examples

    model, tokenizer = build_model(args.model)
    tokenized = tokenize_examples(get_dataset("arithmetic", split="train", size=args.batch_size), tokenizer,
                                  max_seq_len=args.max_seq_len)
    length = max(len(t.input_ids) for t in tokenized)
    ids = torch.tensor([t.input_ids + [tokenizer.pad_token_id] * (length - len(t.input_ids)) for t in tokenized])
    start = time.perf_counter()
    with torch.no_grad():
        model(input_ids=ids)
    return {"peak_rss_mib": peak_rss_mib(), "optimizer_state_bytes": 0,
            "step_seconds": time.perf_counter() - start, "final_loss": None}


def run_peer(args, galore: bool) -> dict:
    import torch
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainerCallback, TrainingArguments

    from tuneforge.data import get_dataset, tokenize_examples

    model, tokenizer = build_model(args.model)
    tokenized = tokenize_examples(get_dataset("arithmetic", split="train", size=args.steps * args.batch_size * 2),
                                  tokenizer, max_seq_len=args.max_seq_len)
    records = [{"input_ids": t.input_ids, "labels": t.labels, "attention_mask": [1] * len(t)} for t in tokenized]
    stamps, losses = [], []
    start = time.perf_counter()

    class StepTimer(TrainerCallback):
        def on_step_end(self, a, state, control, **kw):
            stamps.append(time.perf_counter())

        def on_log(self, a, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                losses.append(logs["loss"])

    extra = dict(optim="galore_adamw_layerwise", optim_target_modules=[r".*self_attn.*", r".*mlp.*"],
                 optim_args="rank=128, update_proj_gap=200, scale=0.25") if galore else dict(optim="adamw_torch")
    training_args = TrainingArguments(
        output_dir=str(Path(args.workdir) / f"{args.model}-peer"), per_device_train_batch_size=args.batch_size,
        max_steps=args.steps, learning_rate=args.lr, lr_scheduler_type="constant", warmup_steps=0,
        max_grad_norm=0.0 if galore else 1.0, logging_steps=1, save_strategy="no", report_to=[], disable_tqdm=True,
        use_cpu=args.device == "cpu", bf16=args.precision == "bf16", dataloader_num_workers=0, seed=0, **extra)
    trainer = Trainer(model=model, args=training_args, train_dataset=records, callbacks=[StepTimer()],
                      data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100))
    trainer.train()
    optimizer = trainer.optimizer
    states = getattr(optimizer, "state", {}) if optimizer is not None else {}
    state_bytes = sum(t.numel() * t.element_size() for s in states.values() for t in s.values() if torch.is_tensor(t))
    return {"peak_rss_mib": peak_rss_mib(), "optimizer_state_bytes": state_bytes,
            "step_seconds": _mean_step(stamps, start), "final_loss": losses[-1] if losses else None}


def _mean_step(stamps: list[float], start: float) -> float:
    """Mean seconds per step over steps 2..N (step 1 holds allocator warm-up); step 1 alone if N = 1."""
    if len(stamps) < 2:
        return stamps[0] - start if stamps else float("nan")
    return (stamps[-1] - stamps[0]) / (len(stamps) - 1)


def child_main(args) -> None:
    import torch

    torch.manual_seed(0)
    if args.cpu_memory == "lean" and (args.child == "inference" or args.child.startswith("peer-")):
        from tuneforge.train.allocator import use_lean_cpu_allocator

        use_lean_cpu_allocator()  # what tuneforge's train() does for training.cpu_memory: lean
    if args.accuracy:
        result = run_accuracy(args.child, args)
    elif args.child == "inference":
        result = run_inference(args)
    elif args.child.startswith("peer-"):
        result = run_peer(args, galore=args.child.endswith("galore-layerwise"))
    else:
        result = run_tuneforge(args.child, args)
    print("RESULT " + json.dumps(result), flush=True)


def run_child(method: str, model: str, args) -> dict | None:
    command = [sys.executable, __file__, "--child", method, "--models", model, "--steps", str(args.steps),
               "--batch-size", str(args.batch_size), "--max-seq-len", str(args.max_seq_len), "--lr", str(args.lr),
               "--device", args.device, "--precision", args.precision, "--workdir", args.workdir,
               "--cpu-memory", args.cpu_memory,
               "--eval-examples", str(args.eval_examples)] + (["--accuracy"] if args.accuracy else [])
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        print(f"{method} on {model} failed:\n{done.stderr[-2000:]}", file=sys.stderr)
        return None
    return json.loads(lines[-1][len("RESULT "):])


def available_peers() -> list[str]:
    import importlib.util

    peers = ["inference", "peer-trainer-adamw"]
    if importlib.util.find_spec("galore_torch") is not None:
        peers.append("peer-trainer-galore-layerwise")
    return peers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="smollm2-135m")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"tuneforge methods, from {', '.join(METHODS)}")
    parser.add_argument("--no-peers", action="store_true", help="skip inference and the transformers Trainer runs")
    parser.add_argument("--steps", type=int, help="optimizer steps (default: 8; with --accuracy 100)")
    parser.add_argument("--accuracy", action="store_true",
                        help="train each method on the demo's task and budget and report held-out exact match")
    parser.add_argument("--eval-examples", type=int, default=64, help="--accuracy: held-out problems scored")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-seq-len", type=int, default=256)
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--cpu-memory", default="default", choices=["default", "lean"],
                        help="training.cpu_memory for every side (lean: freed memory goes back to the OS)")
    parser.add_argument("--workdir", default="/tmp/tuneforge-full-ft-bench")
    parser.add_argument("--child", choices=[*METHODS, *PEERS])
    parser.add_argument("--output", help="also write the results as JSON here")
    args = parser.parse_args()
    if args.steps is None:
        args.steps = ACCURACY_STEPS if args.accuracy else 8
    if args.child:
        args.model = args.models
        child_main(args)
        return
    methods = args.methods.split(",")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise SystemExit(f"--methods: unknown {unknown}; choose from {', '.join(METHODS)}")
    if "adamw" not in methods:
        methods.insert(0, "adamw")  # the baseline of every ratio
    rows = _earlier_rows(args)
    done = {(r["model"], r["method"], r.get("cpu_memory", "default")) for r in rows}
    peers = [] if args.no_peers or args.accuracy else available_peers()
    for model in args.models.split(","):
        for method in methods + peers:
            if (model, method, args.cpu_memory) in done:
                print(f"{method} on {model}: kept from {args.output}", flush=True)
                continue
            result = run_child(method, model, args)
            if result is not None:
                rows.append({"model": model, "method": method, "cpu_memory": args.cpu_memory, **result})
                print(json.dumps(rows[-1]), flush=True)
                if args.output:  # after every row, so a long run that is stopped keeps what it measured
                    Path(args.output).write_text(json.dumps(rows, indent=2))
    (print_accuracy_table if args.accuracy else print_table)(rows)
    if args.output:
        Path(args.output).write_text(json.dumps(rows, indent=2))


def _earlier_rows(args) -> list[dict]:
    """Rows an earlier run with the same mode wrote to ``--output``: a stopped run resumes where it was."""
    if not args.output or not Path(args.output).exists():
        return []
    rows = json.loads(Path(args.output).read_text())
    wanted = "exact_match" if args.accuracy else "optimizer_state_bytes"
    return [r for r in rows if wanted in r]


def print_accuracy_table(rows: list[dict]) -> None:
    baseline = {r["model"]: r["exact_match"] for r in rows if r["method"] == "adamw"}
    print("\n| model | method | lr | exact match | vs full AdamW | first / last loss | s/step | peak RSS MiB |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        ratio = r["exact_match"] / baseline[r["model"]] if baseline.get(r["model"]) else float("nan")
        print(f"| {r['model']} | {r['method']} | {r['lr']:g} | {r['exact_match']:.1%} | {ratio:.2f}x | "
              f"{r['first_loss']:.3f} / {r['final_loss']:.3f} | {r['step_seconds']:.2f} | {r['peak_rss_mib']:.0f} |")


def print_table(rows: list[dict]) -> None:
    """Each ratio is against full AdamW of the same model and the same cpu_memory setting."""
    def setting(row):
        return row["model"], row.get("cpu_memory", "default")

    baseline = {setting(r): r["peak_rss_mib"] for r in rows if r["method"] == "adamw"}
    print("\n| model | cpu_memory | method | peak RSS MiB | vs full AdamW | optimizer state MiB | s/step | last loss |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        ratio = r["peak_rss_mib"] / baseline[setting(r)] if setting(r) in baseline else float("nan")
        loss = f"{r['final_loss']:.4f}" if r["final_loss"] is not None else "-"
        print(f"| {r['model']} | {setting(r)[1]} | {r['method']} | {r['peak_rss_mib']:.0f} | {ratio:.2f}x | "
              f"{r['optimizer_state_bytes'] / 2**20:.1f} | {r['step_seconds']:.3f} | {loss} |")


if __name__ == "__main__":
    main()
