"""Loopback load test of `tuneforge serve`: a fixed number of requests at a fixed concurrency.

Starts its own server on a free loopback port (smollm2-135m + --adapters random LoRAs, r=8 on
q, k, v, o), unless --url points at a running one; sends --requests completions, --concurrency at a
time, each to adapter i mod --adapters (or the base when --adapters is 0); stops when all have
answered (after one untimed warm-up request per adapter); prints p50/p99 latency, throughput and the number of failed requests (exit code 1 if any).

    OMP_NUM_THREADS=2 python bench/serve_load_test.py                         # 64 requests, 8 at a time
    python bench/serve_load_test.py --url http://127.0.0.1:8000/v1 --model my-adapter --requests 200
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

PROMPTS = ["What is 12 plus 7?", "Write one sentence about the sea.", "List three colours.",
           "Name a fruit that is yellow.", "What is the capital of Italy?", "Why is the sky blue?"]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default=None, help="base URL of a running server (…/v1); default: start one here")
    parser.add_argument("--model", default="smollm2-135m", help="base model to serve, or the model field to send with --url")
    parser.add_argument("--adapters", type=int, default=8, help="random adapters to create and spread requests over")
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--max-batch-size", type=int, default=8)
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--timeout", type=float, default=600.0, help="per-request client timeout in seconds")
    return parser.parse_args(argv)


def start_server(args, adapters_dir: Path | None) -> tuple[str, object, threading.Thread]:
    import uvicorn

    from tuneforge.serve.command import add_serve_arguments, build_app

    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    serve_args = parser.parse_args(["--model", args.model, "--max-batch-size", str(args.max_batch_size),
                                    "--max-queue", str(max(args.requests, 1)),
                                    "--max-loaded-adapters", str(max(args.adapters, 1))]
                                   + (["--adapters-dir", str(adapters_dir)] if adapters_dir else []))
    app = build_app(serve_args)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        if not thread.is_alive():
            raise SystemExit("the server failed to start")
        time.sleep(0.05)
    return f"http://127.0.0.1:{port}/v1", server, thread


def make_adapters(model_name: str, root: Path, count: int) -> None:
    sys.path.insert(0, str(Path(__file__).parent))
    from serve_throughput import make_adapters as write_adapters

    from tuneforge.models import load_model

    write_adapters(load_model(model_name, dtype="float32", device="cpu").model, root, count, rank=8)


def send_all(url: str, models: list[str], args) -> list[tuple[float, int, str]]:
    import httpx

    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}

    def one(index: int) -> tuple[float, int, str]:
        body = {"model": models[index % len(models)], "prompt": PROMPTS[index % len(PROMPTS)],
                "max_tokens": args.max_tokens, "temperature": 0}
        start = time.perf_counter()
        try:
            response = httpx.post(f"{url}/completions", json=body, headers=headers, timeout=args.timeout)
            status, detail = response.status_code, "" if response.status_code == 200 else response.text[:200]
        except httpx.HTTPError as error:
            status, detail = 0, f"{type(error).__name__}: {error}"
        return time.perf_counter() - start, status, detail

    with ThreadPoolExecutor(max_workers=args.concurrency) as pool:
        return list(pool.map(one, range(args.requests)))


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


def main(argv=None) -> int:
    args = parse_args(argv)
    server = thread = None
    with tempfile.TemporaryDirectory() as scratch:
        if args.url:
            url, models = args.url.rstrip("/"), [args.model]
        else:
            adapters_dir = Path(scratch) if args.adapters else None
            if adapters_dir:
                make_adapters(args.model, adapters_dir, args.adapters)
            url, server, thread = start_server(args, adapters_dir)
            models = [f"lora{i:02d}" for i in range(args.adapters)] or [args.model]
        warm_up = argparse.Namespace(**{**vars(args), "requests": len(models), "concurrency": 1, "max_tokens": 1})
        send_all(url, models, warm_up)  # loads every adapter once: on-demand loading is not what is timed
        start = time.perf_counter()
        outcomes = send_all(url, models, args)
        wall = time.perf_counter() - start
        if server is not None:
            server.should_exit = True
            thread.join(60)
    latencies = [seconds for seconds, status, _ in outcomes if status == 200]
    failures = [(status, detail) for _, status, detail in outcomes if status != 200]
    summary = {
        "requests": args.requests, "concurrency": args.concurrency, "max_tokens": args.max_tokens,
        "adapters": args.adapters, "failed": len(failures), "wall_s": round(wall, 2),
        "requests_per_s": round(args.requests / wall, 3),
        "p50_latency_s": round(statistics.median(latencies), 3) if latencies else None,
        "p99_latency_s": round(percentile(latencies, 0.99), 3) if latencies else None,
    }
    print(json.dumps(summary))
    for status, detail in failures[:5]:
        print(f"failed: {status} {detail}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
