"""Co-serving: a fine-tuning job and inference on one copy of the base, in one engine (FlexLLM's question).

Three phases on the same base model, training data and requests:

  (1) train alone     tuneforge's `train` on its own copy of the base: optimizer-step tokens/s over wall time
  (2) serve alone     --clients threads, each sending greedy chat requests (--new-tokens, eos ignored) back
                      to back for --seconds: latency p50/p99 and generated tokens/s
  (3) co-served       the same job through the server's FineTuningService (train() on the *served* model,
                      turns on the engine lock under --share / --slo-queue) while the same clients run

    python bench/coserve.py                                  # smollm2-135m, 16 clients (slow on a laptop)
    python bench/coserve.py --tiny --clients 4 --steps 10 --seconds 5     # smoke run on a random 2-layer Llama

Reported, and checked against the issue's goals: job throughput under load >= 60% of training alone;
inference p50 under the job <= 1.5x p50 without it. Throughput is training tokens over the job's wall
time (the last `tokens_seen` / `elapsed_seconds` of its metrics.jsonl), so time given to decoding counts.
Peak memory is not split per phase here (one process); one model is loaded for (2) and (3) by construction.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

QUESTIONS = ["What is {a} plus {b}?", "Name a colour and a number above {a}.", "Count from {a} to {b}."]


def training_lines(count: int) -> bytes:
    lines = []
    for i in range(count):
        a, b = i % 17, i % 11 + 3
        question = QUESTIONS[i % len(QUESTIONS)].format(a=a, b=b)
        lines.append(json.dumps({"messages": [{"role": "user", "content": question},
                                              {"role": "assistant", "content": f"The answer is {a + b}."}]}))
    return ("\n".join(lines) + "\n").encode()


def load(args):
    from tuneforge.models import load_model
    from tuneforge.models.resolve import load_tokenizer

    if not args.tiny:
        loaded = load_model(args.model, device=args.device)
        return loaded.model, loaded.tokenizer
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = load_tokenizer(args.model)
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=512)
    return LlamaForCausalLM(config).eval(), tokenizer


def throughput(run_dir: Path) -> float:
    last = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if "tokens_seen" in line][-1]
    return last["tokens_seen"] / last["elapsed_seconds"]


def train_alone(args, data_file: Path, out: Path) -> float:
    from tuneforge.config.schema import TrainConfig
    from tuneforge.train import train

    model, tokenizer = load(args)
    config = TrainConfig.model_validate({
        "model": args.model, "device": args.device, "output_dir": str(out / "alone"),
        "adapter": {"method": "lora", "r": 8, "alpha": 16},
        "data": {"train": str(data_file), "format": "messages", "packing": False, "max_seq_len": 256},
        "training": {"max_steps": args.steps, "batch_size": args.batch_size, "log_every": 1, "warmup_ratio": 0.0},
    })
    train(config, model_and_tokenizer=(model, tokenizer))
    return throughput(out / "alone")


def clients_run(engine, prompt_ids, args, until) -> list[float]:
    from tuneforge.serve.engine import GenerationRequest
    from tuneforge.serve.sampling import SamplingParams

    latencies: list[float] = []
    lock = threading.Lock()

    def client():
        while not until():
            start = time.perf_counter()
            engine.submit(GenerationRequest(tuple(prompt_ids), SamplingParams(max_tokens=args.new_tokens,
                                                                              ignore_eos=True))).result(600)
            with lock:
                latencies.append(time.perf_counter() - start)

    threads = [threading.Thread(target=client) for _ in range(args.clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return latencies


def summarize(latencies: list[float], seconds: float, new_tokens: int) -> dict:
    ordered = sorted(latencies)
    return {"requests": len(ordered), "p50_s": statistics.median(ordered),
            "p99_s": ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))],
            "tokens_per_s": len(ordered) * new_tokens / seconds}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--tiny", action="store_true", help="a random 2-layer Llama with --model's tokenizer (smoke run)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=30.0, help="length of the serve-alone phase")
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps of the job")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--share", type=float, default=0.5)
    parser.add_argument("--slo-queue", type=int, default=None)
    args = parser.parse_args(argv)

    from tuneforge.data import Message
    from tuneforge.eval.generation import PromptFormat
    from tuneforge.serve.adapters import AdapterManager
    from tuneforge.serve.engine import Engine
    from tuneforge.serve.finetune.coserve import CoservePolicy
    from tuneforge.serve.finetune.files import Upload
    from tuneforge.serve.finetune.jobs import FineTuningService, JobSpec

    with tempfile.TemporaryDirectory() as scratch:
        out = Path(scratch)
        data = training_lines(args.steps * args.batch_size)
        (out / "train.jsonl").write_bytes(data)
        alone = train_alone(args, out / "train.jsonl", out)

        model, tokenizer = load(args)
        manager = AdapterManager(model, None)
        engine = Engine(model, tokenizer, adapters=manager, max_batch_size=args.clients)
        service = FineTuningService(out / "state", engine, manager, args.model,
                                    CoservePolicy(args.share, args.slo_queue))
        prompt_ids = PromptFormat.for_tokenizer("auto", tokenizer).encode([Message("user", "Tell me a story.")], tokenizer)
        engine.start()
        service.start()
        try:
            started = time.perf_counter()
            serving = summarize(clients_run(engine, prompt_ids, args, lambda: time.perf_counter() - started > args.seconds),
                                time.perf_counter() - started, args.new_tokens)
            file_id = service.files.add(Upload("train.jsonl", data, "fine-tune"))["id"]
            epochs = 1  # steps x batch examples: one epoch is exactly --steps steps
            job = service.create(JobSpec(args.model, file_id, None, "bench", epochs, args.batch_size, 1.0, 42))
            started = time.perf_counter()
            finished = lambda: service.get(job["id"])["status"] in ("succeeded", "failed", "cancelled")  # noqa: E731
            coserved = summarize(clients_run(engine, prompt_ids, args, finished), time.perf_counter() - started,
                                 args.new_tokens)
            status = service.get(job["id"])
            if status["status"] != "succeeded":
                print(f"the co-served job ended {status['status']}: {status['error']}", file=sys.stderr)
                return 1
            under_load = throughput(service.jobs_dir / job["id"] / "run")
        finally:
            service.stop()
            engine.stop()

    report = {"model": "tiny-random" if args.tiny else args.model, "clients": args.clients, "share": args.share,
              "train_alone_tokens_per_s": alone, "train_under_load_tokens_per_s": under_load,
              "train_ratio": under_load / alone, "serve_alone": serving, "serve_with_job": coserved,
              "p50_ratio": coserved["p50_s"] / serving["p50_s"]}
    print(json.dumps(report, indent=2))
    print(f"goal: job under load >= 60% of alone: {report['train_ratio']:.2f} "
          f"({'met' if report['train_ratio'] >= 0.6 else 'missed'}); "
          f"p50 with job <= 1.5x without: {report['p50_ratio']:.2f} ({'met' if report['p50_ratio'] <= 1.5 else 'missed'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
