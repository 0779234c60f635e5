"""Several processes against one: tokens/s and per-rank peak memory of `tuneforge train` with DDP and FSDP2.

Each setup trains the same config (LoRA on the bundled arithmetic task, the same global batch) under
`torchrun --standalone`, with OMP_NUM_THREADS threads per process:

    1x1  one process, one thread          (the baseline)
    1x2  one process, two threads         (the same cores used by intra-op threads)
    2x1  two processes, one thread each   (DDP over gloo, or NCCL on GPUs)

and full finetuning (AdamW) of every weight, the FSDP2 memory figure:

    full-1x1  one process, one thread                 (the whole model, gradients and AdamW state)
    fsdp-2x1  two processes, one thread each, FSDP2   (each rank holds half of all three)

    python bench/distributed_scaling.py --model tiny --steps 2 --setups 2x1       # smoke test
    python bench/distributed_scaling.py --model smollm2-135m --steps 20 --batch-size 8
    python bench/distributed_scaling.py --model llama-0.5b-random --setups full-1x1,fsdp-2x1 --steps 3 \
        --batch-size 2 --max-seq-len 128                                          # the FSDP2 figure

On a 2-core CPU the point is not speed (two processes on two cores do the work of one process on
two threads, plus an all-reduce); it is that the run is the same and what each process costs.
Tokens/s is rank 0's: the global batch's tokens over the optimizer-step time. Peak memory is each
process's own (VmHWM on CPU, including the model load; max allocated on CUDA).

The FSDP2 figure is the largest per-rank peak of fsdp-2x1 over the peak of full-1x1 (goal: at most
0.6; the ideal is 0.5 plus what is not sharded: activations, one gathered layer, the libraries).
``llama-0.5b-random`` is the random 0.5B Llama of bench/full_finetune_memory.py, saved once under
--workdir (1.6 GB) so that every process loads it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

SETUPS = {"1x1": (1, 1), "1x2": (1, 2), "2x1": (2, 1)}  # name -> (processes, threads per process); LoRA, DDP
FULL_SETUPS = {"full-1x1": (1, 1), "fsdp-2x1": (2, 1)}  # full finetuning; FSDP2 on 2 processes
SRC = Path(__file__).resolve().parents[1] / "src"


def prepare_model(name: str, workdir: Path) -> str:
    """``tiny`` and ``llama-0.5b-random``: random Llamas saved as a transformers directory every process
    loads; any other name is passed on."""
    if name == "llama-0.5b-random":
        return _random_05b(workdir / "llama-0.5b-random")
    if name != "tiny":
        return name
    folder = workdir / "tiny-model"
    if not (folder / "config.json").exists():
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        from tiny_models import tiny_chat_model_and_tokenizer

        model, tokenizer = tiny_chat_model_and_tokenizer()
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    return str(folder)


def _random_05b(folder: Path) -> str:
    if not (folder / "config.json").exists():
        import torch
        from transformers import LlamaConfig, LlamaForCausalLM

        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from full_finetune_memory import RANDOM_CONFIGS

        from tuneforge.models import load_tokenizer

        torch.manual_seed(0)
        LlamaForCausalLM(LlamaConfig(**RANDOM_CONFIGS["llama-0.5b-random"])).save_pretrained(folder)
        load_tokenizer("smollm2-135m").save_pretrained(folder)
    return str(folder)


def train_settings(args, model: str, run_dir: Path, full: bool = False) -> dict:
    adapter = {"method": "full"} if full else {"method": "lora", "r": 8, "dropout": 0.0}
    return {
        "model": model, "device": args.device, "output_dir": str(run_dir), "adapter": adapter,
        **({"distributed": {"strategy": "fsdp"}} if full else {}),  # auto would pick it too; said for the reader
        "data": {"train": "arithmetic", "options": {"size": args.steps * args.batch_size * 2},
                 "max_seq_len": args.max_seq_len, "eval_size": 0},
        "training": {"max_steps": args.steps, "batch_size": args.batch_size, "lr": 1e-4, "warmup_steps": 0,
                     "log_every": 1, "seed": 0},
    }


def run_setup(name: str, args, model: str) -> dict:
    processes, threads = {**SETUPS, **FULL_SETUPS}[name]
    workdir = Path(args.workdir)
    config_path = workdir / f"{name}.json"
    config_path.write_text(json.dumps(train_settings(args, model, workdir / f"run-{name}", full=name in FULL_SETUPS)))
    results = workdir / f"results-{name}"
    results.mkdir(parents=True, exist_ok=True)
    for old in results.glob("rank-*.json"):
        old.unlink()
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    env.pop("WORLD_SIZE", None)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes),
               __file__, "--worker", str(config_path), str(results)]
    subprocess.run(command, env=env, check=True)
    ranks = [json.loads(path.read_text()) for path in sorted(results.glob("rank-*.json"))]
    if len(ranks) != processes:
        raise RuntimeError(f"{name}: {len(ranks)} of {processes} processes reported")
    return {"setup": name, "processes": processes, "threads_per_process": threads,
            "tokens_per_second": ranks[0]["tokens_per_second"],
            "peak_memory_mib_per_rank": [rank["peak_memory_mib"] for rank in ranks],
            "final_train_loss": ranks[0]["final_train_loss"]}


def worker(config_path: str, results: str) -> None:
    """One process of a setup (run by torchrun): train, then record this rank's numbers."""
    import torch

    from tuneforge.config import parse_train_config
    from tuneforge.train import train
    from tuneforge.train.strategy import shutdown_process_group

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    config = parse_train_config(json.loads(Path(config_path).read_text()))
    try:
        summary = train(config, overwrite=True)
    finally:
        shutdown_process_group()
    rank = int(os.environ.get("RANK", "0"))
    record = {"rank": rank, "tokens_per_second": summary.tokens_per_second, "peak_memory_mib": summary.peak_memory_mb,
              "final_train_loss": summary.final_train_loss}
    Path(results, f"rank-{rank}.json").write_text(json.dumps(record))


def markdown(rows: list[dict]) -> str:
    lines = ["| setup | processes x threads | tokens/s | peak memory per rank (MiB) | final loss |", "|---|---|---|---|---|"]
    for row in rows:
        peaks = ", ".join(f"{p:.0f}" for p in row["peak_memory_mib_per_rank"])
        lines.append(f"| {row['setup']} | {row['processes']} x {row['threads_per_process']} | "
                     f"{row['tokens_per_second']:,.0f} | {peaks} | {row['final_train_loss']:.4f} |")
    by_name = {row["setup"]: row for row in rows}
    if "full-1x1" in by_name and "fsdp-2x1" in by_name:
        ratio = max(by_name["fsdp-2x1"]["peak_memory_mib_per_rank"]) / by_name["full-1x1"]["peak_memory_mib_per_rank"][0]
        lines.append(f"\nFSDP2 full finetuning, largest per-rank peak at 2 ranks / peak of 1 process: {ratio:.2f}x "
                     "(goal: at most 0.6x)")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m",
                        help="tiny, llama-0.5b-random, an embedded name or a local directory")
    parser.add_argument("--setups", default=",".join(SETUPS), help=f"from {', '.join([*SETUPS, *FULL_SETUPS])}")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=8, help="the global micro-batch (even: 2 ranks split it)")
    parser.add_argument("--max-seq-len", type=int, default=256)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--workdir", default="/tmp/tuneforge-distributed-bench")
    parser.add_argument("--output", help="also write the results as JSON here")
    parser.add_argument("--worker", nargs=2, metavar=("CONFIG", "RESULTS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(*args.worker)
        return
    Path(args.workdir).mkdir(parents=True, exist_ok=True)
    model = prepare_model(args.model, Path(args.workdir))
    rows = [run_setup(name, args, model) for name in args.setups.split(",")]
    print(markdown(rows))
    if args.output:
        Path(args.output).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
