"""Training throughput and peak memory: tuneforge vs transformers Trainer + peft, best against best.

Both sides train the same base model (smollm2-135m, and a ~0.5B random-initialised Llama config) with
the same LoRA config (r=16, alpha=32, all linear layers), the same data, SmolLM2's chat template, loss
on answers only, the same optimizer, learning rate, batch size (in examples per step) and number of
steps. Each run is its own child process, so that its peak memory (max RSS on CPU, max allocated on
CUDA) is its own.

    python bench/train_throughput.py                                   # both models, both tasks, 3 repeats
    python bench/train_throughput.py --models smollm2-135m --tasks long-answer --repeats 5
    python bench/train_throughput.py --precisions fp32,bf16            # try bf16 even where it is not native

Tasks: ``arithmetic`` (the bundled task: short answers) and ``long-answer`` (generated here: each answer
is a multiplication table, at least 3x longer in tokens than the opening all prompts share; the bench
checks that ratio on the tokenized data and says so).

Best against best: each side runs every setting it could be run with here (precision fp32, plus bf16
where the hardware multiplies bf16 natively, or as --precisions says; tuneforge also compiled with
--compile, and with fused projections unless --no-fused; the peer's TrainingArguments(bf16=True) is its
bf16), each setting --repeats times with the
sides interleaved; a side's best setting is the one with the highest median tokens/s, and the ratios
compare the two best settings. The spread is the min-max over the repeats.

The report starts with the machine: CPU flags (avx2, avx512f, avx512_bf16, amx_bf16) and the measured
--threads matmul peak in float32 and bf16. MFU = tokens/s x 4 x (weights of the model's Linear layers)
/ that peak: LoRA training with a frozen base multiplies each token by each base weight twice, forward
and input gradient (2 FLOPs each); attention scores and the adapters' own small products are left out.
tuneforge's tokens/s counts a shared prefix once per example, so its MFU is the rate of useful work.

The peer pads each batch of --examples-per-step examples to its longest. tuneforge packs the examples
into rows of --max-seq-len tokens (as `tuneforge train` does by default), holding the opening that all
of them share once per row (data.share_prefix), and takes as many rows per step as hold about
--examples-per-step examples. Tokens/s counts the real (unpadded) tokens of the examples, identically
for both sides, over steps 2..N (step 1 holds allocator warm-up and, compiled, the compilation).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

RANDOM_05B = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                  num_key_value_heads=8, vocab_size=49152, max_position_embeddings=2048, tie_word_embeddings=True)
TASKS = ("arithmetic", "long-answer")
LONG_ANSWER_SYSTEM = "Write out the whole table."
MIN_ANSWER_TO_OPENING = 3.0  # the long-answer task's answers are at least this many times its shared opening


def build_model(name: str):
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    from tuneforge.models import load_model, load_tokenizer

    if name == "llama-0.5b-random":
        torch.manual_seed(0)
        return LlamaForCausalLM(LlamaConfig(**RANDOM_05B)), load_tokenizer("smollm2-135m")
    if Path(name).is_dir():  # a saved model directory (the smoke test's tiny model)
        from transformers import AutoTokenizer

        return AutoModelForCausalLM.from_pretrained(name, dtype=torch.float32), AutoTokenizer.from_pretrained(name)
    loaded = load_model(name, dtype="float32")
    return loaded.model, loaded.tokenizer


def build_tokenizer(name: str):
    from tuneforge.models import load_tokenizer

    if name == "llama-0.5b-random":
        return load_tokenizer("smollm2-135m")
    if Path(name).is_dir():
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(name)
    return load_tokenizer(name)


def long_answer_records(count: int, seed: int = 0) -> list[dict]:
    """Chat records whose answers (a table of 14-18 rows) dwarf the system prompt every prompt opens with."""
    rng = random.Random(seed)
    records = []
    for _ in range(count):
        base, rows = rng.randint(2, 99), rng.randint(14, 18)
        table = "\n".join(f"{base} x {i} = {base * i}" for i in range(1, rows + 1))
        records.append({"messages": [
            {"role": "system", "content": LONG_ANSWER_SYSTEM},
            {"role": "user", "content": f"The table of {base} up to {base} x {rows}."},
            {"role": "assistant", "content": table}]})
    return records


def task_source(task: str, count: int, workdir: Path) -> str:
    """What tuneforge's data.train names: the bundled dataset, or the generated task's JSONL file."""
    if task == "arithmetic":
        return "arithmetic"
    path = workdir / f"{task}-{count}.jsonl"
    if not path.exists():
        workdir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in long_answer_records(count)))
        tmp.replace(path)
    return str(path)


def training_examples(task: str, tokenizer, count: int, max_seq_len: int, workdir: Path):
    from tuneforge.data import get_dataset, load_examples, tokenize_examples

    if task == "arithmetic":
        examples = get_dataset("arithmetic", split="train", size=count)
    else:
        examples = load_examples(task_source(task, count, workdir)).examples
    return tokenize_examples(examples, tokenizer, max_seq_len=max_seq_len)


def shared_opening_tokens(tokenized) -> int:
    """Tokens every example opens with (the longest common prefix of their input ids)."""
    first = list(tokenized[0].input_ids)
    length = len(first)
    for example in tokenized[1:]:
        ids = example.input_ids
        length = next((i for i in range(min(length, len(ids))) if ids[i] != first[i]), min(length, len(ids)))
    return length


def answer_tokens(example) -> int:
    return sum(1 for label in example.labels if label != -100)


def check_long_answers(tokenized) -> dict:
    """The long-answer task's promise, measured on the tokens: every answer >= 3x the shared opening."""
    opening = shared_opening_tokens(tokenized)
    shortest = min(answer_tokens(e) for e in tokenized)
    ratio = shortest / max(opening, 1)
    if ratio < MIN_ANSWER_TO_OPENING:
        raise SystemExit(f"long-answer task: the shortest answer has {shortest} tokens, only {ratio:.1f}x the "
                         f"{opening}-token shared opening (needs {MIN_ANSWER_TO_OPENING}x); raise the table sizes")
    return {"shared_opening_tokens": opening, "shortest_answer_tokens": shortest, "answer_to_opening": ratio}


def peak_memory_mb(device: str) -> float:
    import torch

    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def steady_rate(timestamps: list[float], tokens: list[int]) -> tuple[float, float]:
    """(tokens/s, seconds) over steps 2..N: step 1 (allocator warm-up, compilation) is excluded for both sides."""
    seconds = timestamps[-1] - timestamps[0]
    return sum(tokens[1:]) / seconds, seconds


def linear_weights(model) -> int:
    """Weights of the Linear layers (the LM head included, tied or not): what each token is multiplied by."""
    from torch import nn

    return sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))


def packed_rows_per_step(tokenized, args) -> int:
    """Packed rows holding about --examples-per-step examples, the peer's batch: measured on the
    packing tuneforge will do (a shared opening lets more examples into a row)."""
    from tuneforge.data import BatchPlan

    plan = BatchPlan(tokenized, 1, packing=True, max_seq_len=args.max_seq_len, share_prefix=not args.no_share_prefix)
    examples_per_row = len(tokenized) / len(plan.rows)
    return max(1, round(args.examples_per_step / examples_per_row))


def run_tuneforge(args, compile_layers: bool, fused: bool) -> dict:
    import torch

    from tuneforge.config import parse_train_config
    from tuneforge.train import train
    from tuneforge.train.metrics import read_metrics

    model, tokenizer = build_model(args.model)
    weights = linear_weights(model)
    if args.precision == "bf16":
        model.to(torch.bfloat16)  # what `dtype: auto` loads under bf16; the adapter stays float32
    count = args.steps * args.examples_per_step
    tokenized = training_examples(args.task, tokenizer, count, args.max_seq_len, Path(args.workdir))
    rows_per_step = packed_rows_per_step(tokenized, args)
    run_dir = Path(args.workdir) / f"{args.side}-{args.task}-{args.precision}"
    config = parse_train_config({
        "output_dir": str(run_dir), "device": args.device,
        "adapter": {"method": "lora", "r": 16, "alpha": 32, "target_modules": "all-linear"},
        "data": {"train": task_source(args.task, count, Path(args.workdir)), "options":
                 {"size": len(tokenized)} if args.task == "arithmetic" else {}, "max_seq_len": args.max_seq_len,
                 "packing": True, "share_prefix": not args.no_share_prefix, "eval_size": 0},
        "training": {"max_steps": args.steps, "batch_size": rows_per_step, "lr": 1e-4, "warmup_steps": 0,
                     "scheduler": "constant", "max_grad_norm": 1.0, "log_every": 1, "precision": args.precision,
                     "compile": compile_layers, "fused_projections": fused},
    })
    stamps = []
    train(config, overwrite=True, model_and_tokenizer=(model, tokenizer), on_step=lambda s, l: stamps.append(time.perf_counter()))
    seen = [r["tokens_seen"] for r in read_metrics(run_dir / "metrics.jsonl") if "tokens_seen" in r]
    per_step = [seen[0]] + [b - a for a, b in zip(seen, seen[1:])]
    rate, seconds = steady_rate(stamps, per_step)
    return {"tokens_per_second": rate, "peak_memory_mb": peak_memory_mb(args.device), "seconds": seconds,
            "steps": len(stamps), "linear_weights": weights}


def run_peer(args) -> dict:
    import peft
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainerCallback, TrainingArguments

    model, tokenizer = build_model(args.model)
    weights = linear_weights(model)
    tokenized = training_examples(args.task, tokenizer, args.steps * args.examples_per_step, args.max_seq_len,
                                  Path(args.workdir))
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
    return {"tokens_per_second": rate, "peak_memory_mb": peak_memory_mb(args.device), "seconds": seconds,
            "steps": len(stamps), "linear_weights": weights}


def child_main(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.side == "peer":
        result = run_peer(args)
    else:
        result = run_tuneforge(args, compile_layers=args.side == "tuneforge-compiled",
                               fused=args.side == "tuneforge-fused")
    print("RESULT " + json.dumps(result), flush=True)


def run_child(side: str, model: str, task: str, precision: str, args) -> dict:
    command = [sys.executable, __file__, "--child", side, "--models", model, "--tasks", task, "--steps", str(args.steps),
               "--examples-per-step", str(args.examples_per_step), "--max-seq-len", str(args.max_seq_len),
               "--device", args.device, "--precisions", precision, "--threads", str(args.threads),
               "--workdir", args.workdir]
    if args.no_share_prefix:
        command.append("--no-share-prefix")
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        raise SystemExit(f"{side} ({precision}) on {model}/{task} failed:\n{done.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


# -- the machine ----------------------------------------------------------------------------------

def matmul_peak_gflops(dtype_name: str, threads: int, size: int = 1024, budget_s: float = 1.0,
                       device: str = "cpu") -> float:
    """Best GFLOP/s of a size x size matmul in ``dtype_name`` on ``threads`` threads (2 n^3 FLOPs each)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    try:
        dtype = getattr(torch, dtype_name)
        a, b = (torch.randn(size, size, device=device).to(dtype) for _ in range(2))
        torch.mm(a, b)  # warm-up: thread pool, packing buffers
        sync()
        best, spent = float("inf"), 0.0
        while spent < budget_s:
            start = time.perf_counter()
            torch.mm(a, b)
            sync()
            took = time.perf_counter() - start
            best, spent = min(best, took), spent + took
        return 2 * size**3 / best / 1e9
    finally:
        torch.set_num_threads(before)


def machine_report(args) -> dict:
    from tuneforge.models.precision import REPORTED_CPU_FLAGS, cpu_flags, cpu_multiplies_bf16_natively

    flags = cpu_flags()
    return {"cpu_flags": {flag: flag in flags for flag in REPORTED_CPU_FLAGS},
            "native_bf16": cpu_multiplies_bf16_natively(), "threads": args.threads,
            "peak_gflops": {name: matmul_peak_gflops(dtype, args.threads, args.peak_size, device=args.device)
                            for name, dtype in (("fp32", "float32"), ("bf16", "bfloat16"))}}


def candidate_precisions(args, machine: dict) -> list[str]:
    if args.precisions != "auto":
        return args.precisions.split(",")
    return ["fp32", "bf16"] if machine["native_bf16"] or args.device.startswith("cuda") else ["fp32"]


# -- best against best ----------------------------------------------------------------------------

def summarise(runs: list[dict], peak_gflops: float) -> dict:
    rates = [r["tokens_per_second"] for r in runs]
    median = statistics.median(rates)
    flops_per_token = 4 * runs[0]["linear_weights"]
    return {"tokens_per_second": median, "min": min(rates), "max": max(rates), "repeats": len(rates),
            "peak_memory_mb": statistics.median(r["peak_memory_mb"] for r in runs),
            "mfu": median * flops_per_token / (peak_gflops * 1e9), "steps": runs[0]["steps"]}


def compare(model: str, task: str, args, machine: dict) -> dict:
    precisions = candidate_precisions(args, machine)
    settings = [("tuneforge", p) for p in precisions] + [("peer", p) for p in precisions]
    if not args.no_fused:
        settings += [("tuneforge-fused", p) for p in precisions]
    if args.compile:
        settings += [("tuneforge-compiled", p) for p in precisions]
    runs: dict[tuple[str, str], list[dict]] = {s: [] for s in settings}
    for _ in range(args.repeats):  # interleaved, so a slow spell of the machine hits every setting alike
        for side, precision in settings:
            runs[(side, precision)].append(run_child(side, model, task, precision, args))
    summaries = {f"{side}/{precision}": summarise(r, machine["peak_gflops"][precision])
                 for (side, precision), r in runs.items()}
    best_ours = max((k for k in summaries if not k.startswith("peer/")), key=lambda k: summaries[k]["tokens_per_second"])
    best_peer = max((k for k in summaries if k.startswith("peer/")), key=lambda k: summaries[k]["tokens_per_second"])
    ours, peer = summaries[best_ours], summaries[best_peer]
    return {"model": model, "task": task, "settings": summaries, "best_tuneforge": best_ours, "best_peer": best_peer,
            "speedup": ours["tokens_per_second"] / peer["tokens_per_second"],
            "speedup_range": [ours["min"] / peer["max"], ours["max"] / peer["min"]],
            "memory_ratio": ours["peak_memory_mb"] / peer["peak_memory_mb"]}


def print_report(machine: dict, rows: list[dict]) -> None:
    flags = " ".join(f"{name}={'yes' if present else 'no'}" for name, present in machine["cpu_flags"].items())
    peaks = machine["peak_gflops"]
    print(f"\nCPU: {flags}; {machine['threads']}-thread matmul peak: fp32 {peaks['fp32']:.1f} GFLOP/s, "
          f"bf16 {peaks['bf16']:.1f} GFLOP/s")
    print("\n| model | task | setting | tok/s (median) | spread (min-max) | MFU | peak MiB |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        for name, s in row["settings"].items():
            best = " **best**" if name in (row["best_tuneforge"], row["best_peer"]) else ""
            print(f"| {row['model']} | {row['task']} | {name}{best} | {s['tokens_per_second']:.1f} | "
                  f"{s['min']:.1f}-{s['max']:.1f} | {100 * s['mfu']:.1f}% | {s['peak_memory_mb']:.0f} |")
    print("\n| model | task | best tuneforge | best peer | speed ratio (spread) | memory ratio |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        low, high = row["speedup_range"]
        print(f"| {row['model']} | {row['task']} | {row['best_tuneforge']} | {row['best_peer']} | "
              f"**{row['speedup']:.2f}x** ({low:.2f}-{high:.2f}) | **{row['memory_ratio']:.2f}x** |")


def main(argv: list[str] | None = None) -> list[dict] | None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="smollm2-135m,llama-0.5b-random",
                        help="embedded names, llama-0.5b-random, or saved model directories")
    parser.add_argument("--tasks", default=",".join(TASKS), help=f"comma-separated, of {', '.join(TASKS)}")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--examples-per-step", type=int, default=16)
    parser.add_argument("--max-seq-len", type=int, default=256,
                        help="truncation length on both sides, and the length of tuneforge's packed rows (default 256)")
    parser.add_argument("--no-share-prefix", action="store_true",
                        help="tuneforge packs without holding the shared opening once per row")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precisions", default="auto",
                        help="settings each side tries: auto (fp32, plus bf16 where native) or e.g. fp32,bf16")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each setting (the spread is over these)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of every run and of the matmul peak")
    parser.add_argument("--peak-size", type=int, default=1024, help="matrix size of the matmul peak measurement")
    parser.add_argument("--compile", action="store_true", help="also try tuneforge with training.compile=true")
    parser.add_argument("--workdir", default="/tmp/tuneforge-bench")
    parser.add_argument("--no-fused", action="store_true", help="skip tuneforge with training.fused_projections=true")
    parser.add_argument("--child", choices=["tuneforge", "tuneforge-fused", "tuneforge-compiled", "peer"])
    parser.add_argument("--output", help="also write the results as JSON here")
    args = parser.parse_args(argv)
    if args.child:
        args.side, args.model, args.task, args.precision = args.child, args.models, args.tasks, args.precisions
        child_main(args)
        return None
    tasks = args.tasks.split(",")
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise SystemExit(f"--tasks: {', '.join(unknown)} unknown; choose from {', '.join(TASKS)}")
    machine = machine_report(args)
    rows = []
    for model in args.models.split(","):
        if "long-answer" in tasks:
            tokenizer = build_tokenizer(model)
            shape = check_long_answers(training_examples("long-answer", tokenizer, args.steps * args.examples_per_step,
                                                         args.max_seq_len, Path(args.workdir)))
            print(f"{model}: long-answer task: shortest answer {shape['shortest_answer_tokens']} tokens, "
                  f"{shape['answer_to_opening']:.1f}x the {shape['shared_opening_tokens']}-token shared opening")
        for task in tasks:
            rows.append(compare(model, task, args, machine))
    print_report(machine, rows)
    if args.output:
        Path(args.output).write_text(json.dumps({"machine": machine, "rows": rows}, indent=2))
    return rows


if __name__ == "__main__":
    main()
