"""QLoRA memory and speed: NF4 + double quantization vs bf16, on the same model, data and LoRA.

Part 1 — stored bytes of the base weights, bf16 vs NF4+double-quant (blocksize 64), for smollm2-135m
and a ~1.1B random-initialised Llama config (TinyLlama's shape). Reported for the quantized Linear
layers (what QLoRA quantizes; goal <= 0.27x, i.e. ~4.13 bits per parameter) and for the whole model
(embeddings and norms stay in bf16).

Part 2 — one LoRA training setup (r=16 on all linear layers, rows of --seq-len tokens, AdamW) run
twice on the 1.1B config, each in its own child process so that its peak RSS is its own:
  (a) LoRA: the base loaded in --dtype (bf16 by default) from safetensors;
  (b) QLoRA: the base quantized to NF4+double quant *as it loads* (the full-precision model never
      exists), computing in --dtype.
Peak process memory (max RSS over the child's life: loading included) and the median step time over
steps 2..N are reported, with the ratios QLoRA / LoRA (goals: memory <= 0.5x, step time <= 1.3x).
On CPUs without bf16 matrix units, bf16 matmuls run tens of times slower than float32 (and partly
single-threaded): use --dtype float32 there.

    python bench/quant_memory.py                       # both parts (~10 min on 2 CPU cores)
    python bench/quant_memory.py --model-size tiny     # a smoke test of the script in seconds
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CONFIGS = {
    "1.1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                 num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048, tie_word_embeddings=False),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=256, max_position_embeddings=256, tie_word_embeddings=False),
}


def weight_bytes(model) -> dict:
    """bf16 bytes vs NF4+double-quant bytes, for the Linear layers below the head and for the whole model."""
    from torch import nn

    from tuneforge.quant import quantize_4bit

    linear_values = linear_nf4 = other_values = 0
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and not name.endswith("lm_head"):
            linear_values += module.weight.numel()
            linear_nf4 += quantize_4bit(module.weight.detach().float(), "nf4", 64, True).nbytes()
    counted = {id(m.weight) for n, m in model.named_modules() if isinstance(m, nn.Linear) and not n.endswith("lm_head")}
    other_values = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values() if id(p) not in counted)
    bf16_linear, bf16_total = 2 * linear_values, 2 * (linear_values + other_values)
    return {
        "linear_params": linear_values, "other_params": other_values,
        "bf16_linear_bytes": bf16_linear, "nf4_linear_bytes": linear_nf4,
        "linear_ratio": linear_nf4 / bf16_linear, "bits_per_param": 8 * linear_nf4 / linear_values,
        "bf16_total_bytes": bf16_total, "nf4_total_bytes": linear_nf4 + 2 * other_values,
        "total_ratio": (linear_nf4 + 2 * other_values) / bf16_total,
    }


def part_one(model_size: str) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from tuneforge.models import load_model

    results = {}
    if model_size != "tiny":
        results["smollm2-135m"] = weight_bytes(load_model("smollm2-135m").model)
    torch.manual_seed(0)
    with torch.device("cpu"):
        model = LlamaForCausalLM(LlamaConfig(**CONFIGS[model_size])).to(torch.bfloat16)
    results[f"llama-{model_size}-random"] = weight_bytes(model)
    return results


def save_random_model(model_size: str, directory: Path, dtype: str) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM._from_config(LlamaConfig(**CONFIGS[model_size]), dtype=getattr(torch, dtype))
    model.save_pretrained(directory)


def peak_rss_mb() -> float:
    """This process's own high-water RSS. Not ru_maxrss: Linux carries that over from the parent through
    fork + exec, so a child of a parent that once held a big model would report the parent's peak."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(args) -> dict:
    """One side of part 2; prints its result as JSON on the last line."""
    import torch

    from tuneforge.adapters import LoraConfig, add_adapter
    from tuneforge.losses import token_loss_sum
    from tuneforge.models.precision import autocast
    from tuneforge.quant.loading import load_quantized

    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    dtype = getattr(torch, args.dtype)
    if args.side == "qlora":
        model = load_quantized(args.model_dir, compute_dtype=dtype, dtype=dtype)
    else:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=dtype)
    load_seconds = time.perf_counter() - start
    add_adapter(model, LoraConfig(r=16, alpha=32, target_modules="all-linear"))
    for param in model.parameters():  # adapter weights train in float32, as in the trainer
        if param.requires_grad:
            param.data = param.data.float()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    generator = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    step_seconds = []
    model.train()
    for _ in range(args.steps):
        ids = torch.randint(0, vocab, (args.batch_size, args.seq_len), generator=generator)
        batch = {"input_ids": ids, "labels": ids.clone()}
        begin = time.perf_counter()
        with autocast("bf16" if dtype == torch.bfloat16 else "fp32", torch.device("cpu")):  # as `tuneforge train`
            loss_sum, count = token_loss_sum(model, batch, 1024)
        (loss_sum / count).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step_seconds.append(time.perf_counter() - begin)
    peak_mb = peak_rss_mb()
    return {"side": args.side, "peak_rss_mb": peak_mb, "load_seconds": load_seconds,
            "step_seconds": step_seconds, "median_step_seconds": statistics.median(step_seconds[1:] or step_seconds)}


def run_side(side: str, model_dir: Path, args, backend: str = "auto") -> dict:
    command = [sys.executable, __file__, "--child", side, "--model-dir", str(model_dir), "--steps", str(args.steps),
               "--seq-len", str(args.seq_len), "--batch-size", str(args.batch_size), "--threads", str(args.threads),
               "--dtype", args.dtype]
    env = {**os.environ, "TUNEFORGE_QUANT_BACKEND": backend}
    done = subprocess.run(command, capture_output=True, text=True, check=False, env=env)
    if done.returncode != 0:
        raise SystemExit(f"{side} child failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-size", choices=sorted(CONFIGS), default="1.1b")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16",
                        help="dtype of the LoRA base and of QLoRA's compute (float32 on CPUs without bf16 matmul units)")
    parser.add_argument("--skip-part-one", action="store_true")
    parser.add_argument("--qlora-backends", nargs="+", default=["auto"], choices=["auto", "torch", "bitsandbytes"],
                        help="run the QLoRA side once per 4-bit decode backend (TUNEFORGE_QUANT_BACKEND)")
    parser.add_argument("--child", choices=["lora", "qlora"], help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        args.side = args.child
        print(json.dumps(child(args)))
        return

    report = {"settings": vars(args)}
    if not args.skip_part_one:
        report["weights"] = part_one(args.model_size)
        for name, row in report["weights"].items():
            print(f"{name}: linear layers {row['bf16_linear_bytes'] / 2**20:.1f} MiB bf16 -> "
                  f"{row['nf4_linear_bytes'] / 2**20:.1f} MiB NF4+DQ ({row['linear_ratio']:.3f}x, "
                  f"{row['bits_per_param']:.3f} bits/param); whole model {row['total_ratio']:.3f}x")
    with tempfile.TemporaryDirectory(prefix="tuneforge-quant-bench-") as tmp:
        model_dir = Path(tmp) / "model"
        save_random_model(args.model_size, model_dir, args.dtype)
        sides = {"lora": run_side("lora", model_dir, args)}
        for backend in args.qlora_backends:
            sides[f"qlora ({backend} decode)"] = run_side("qlora", model_dir, args, backend)
    report["training"] = sides
    lora = sides["lora"]
    report["ratios"] = {}
    for side, row in sides.items():
        print(f"{side:>20}: peak RSS {row['peak_rss_mb']:.0f} MiB, load {row['load_seconds']:.1f} s, "
              f"median step {row['median_step_seconds']:.2f} s")
    for side, row in list(sides.items())[1:]:
        memory_ratio = row["peak_rss_mb"] / lora["peak_rss_mb"]
        time_ratio = row["median_step_seconds"] / lora["median_step_seconds"]
        report["ratios"][side] = {"peak_memory": memory_ratio, "step_time": time_ratio}
        print(f"{side} / {args.dtype} LoRA on llama-{args.model_size}: peak memory {memory_ratio:.2f}x "
              f"(goal <= 0.5x), step time {time_ratio:.2f}x (goal <= 1.3x)")
    print(json.dumps(report))


if __name__ == "__main__":
    main()
