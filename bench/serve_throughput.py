"""Multi-adapter serving throughput: tuneforge's engine vs transformers + peft, same requests.

64 greedy requests spread round-robin over 1, 8 and 32 distinct random LoRA adapters (r=8 on
q, k, v, o of smollm2-135m), every request generating exactly --new-tokens tokens (end-of-sequence
ignored, so every way does the same work). Three ways:

  (a) tuneforge: the engine with continuous batching, every row its own adapter (batched LoRA)
  (b) peft mixed: `PeftModel.generate(adapter_names=[...])`, batches of --batch-size mixed rows
  (c) peft per adapter: `set_adapter(name)`, then one `generate` batch of that adapter's requests

    OMP_NUM_THREADS=2 python bench/serve_throughput.py                     # the default run
    python bench/serve_throughput.py --adapters 1 32 --new-tokens 64 --requests 128

Reported: generated tokens/s (wall time of the whole set, prefill included, after one warm-up
request per way; the fastest of --repeats runs) and the goals: tuneforge with 32 adapters >= 0.7x its own 1-adapter throughput,
and >= 3x the best peft way at 32 adapters. As a sanity check the greedy tokens of (a) and (c) are
compared (float differences between batched and per-adapter math can flip a rare near-tie).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

PROMPTS = [
    "What is 12 plus 7? Answer with a number.",
    "Write one sentence about the sea.",
    "List three colours.",
    "Translate 'good morning' into French.",
    "Why is the sky blue? Answer briefly.",
    "Name a fruit that is yellow.",
    "What is the capital of Italy?",
    "Give me a word that rhymes with cat.",
]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--adapters", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=32, help="tuneforge max_batch_size and peft's mixed batch size")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's, i.e. OMP_NUM_THREADS)")
    parser.add_argument("--ways", nargs="+", default=["tuneforge", "peft-mixed", "peft-per-adapter"])
    parser.add_argument("--repeats", type=int, default=2, help="runs per way and adapter count; the fastest counts (default 2)")
    parser.add_argument("--json", default=None, metavar="FILE", help="also write the results here")
    return parser.parse_args(argv)


def make_adapters(model, root: Path, count: int, rank: int) -> list[str]:
    """`count` random LoRAs in PEFT format; B is random too, so every adapter changes the output."""
    import torch

    from tuneforge.adapters import LoraConfig, add_adapter, delete_adapter, save_adapter
    from tuneforge.adapters.model import wrapped_layers

    names = []
    for index in range(count):
        name = f"lora{index:02d}"
        add_adapter(model, LoraConfig(r=rank, alpha=2 * rank, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]), name)
        generator = torch.Generator().manual_seed(index)
        with torch.no_grad():
            for _, layer in wrapped_layers(model):
                lora_b = layer.adapters[name].lora_B
                lora_b.copy_(torch.randn(lora_b.shape, generator=generator) * 0.02)
        save_adapter(model, root / name, name)
        delete_adapter(model, name)
        names.append(name)
    return names


def prompt_ids(tokenizer, count: int) -> list[list[int]]:
    # Plain prompts (7-12 tokens), not the chat template: SmolLM2's default system prompt would make
    # prefill, which every way does identically, dominate a short run.
    return [list(tokenizer(PROMPTS[i % len(PROMPTS)])["input_ids"]) for i in range(count)]


def run_tuneforge(model, tokenizer, adapters_dir: Path, names: list[str], prompts, args) -> tuple[float, list]:
    from tuneforge.serve.adapters import AdapterManager
    from tuneforge.serve.engine import Engine, GenerationRequest
    from tuneforge.serve.sampling import SamplingParams

    manager = AdapterManager(model, adapters_dir, max_loaded_adapters=max(len(names), 1))
    engine = Engine(model, tokenizer, adapters=manager, max_batch_size=args.batch_size, max_queue=len(prompts) + 1)
    params = SamplingParams(max_tokens=args.new_tokens, ignore_eos=True)
    for name in names:
        manager.load(name)  # loading is not what is measured
    engine.generate([GenerationRequest(tuple(prompts[0]), params, names[0])])  # warm-up
    requests = [GenerationRequest(tuple(p), params, names[i % len(names)]) for i, p in enumerate(prompts)]
    start = time.perf_counter()
    results = engine.generate(requests)
    seconds = time.perf_counter() - start
    for name in names:
        manager.unload(name)
    return seconds, [list(r.token_ids) for r in results]


def peft_model(base, adapters_dir: Path, names: list[str]):
    from peft import PeftModel

    model = PeftModel.from_pretrained(base, str(adapters_dir / names[0]), adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(str(adapters_dir / name), adapter_name=name)
    return model.eval()


def peft_generate(model, tokenizer, prompts, adapter_names=None, new_tokens: int = 16) -> list[list[int]]:
    import torch

    from tuneforge.eval.generation import left_pad

    input_ids, attention_mask = left_pad(prompts, tokenizer.pad_token_id)
    extra = {"adapter_names": adapter_names} if adapter_names is not None else {}
    with torch.no_grad():
        # No end-of-sequence token at all (not min_new_tokens, which would forbid it): every row generates
        # exactly new_tokens tokens, as the engine's ignore_eos does, and greedy choices stay comparable.
        out = model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=new_tokens,
                             do_sample=False, pad_token_id=tokenizer.pad_token_id, eos_token_id=None, **extra)
    return out[:, input_ids.shape[1]:].tolist()


def run_peft_mixed(model, tokenizer, names, prompts, args) -> tuple[float, list]:
    peft_generate(model, tokenizer, prompts[:1], [names[0]], args.new_tokens)  # warm-up
    owners = [names[i % len(names)] for i in range(len(prompts))]
    start = time.perf_counter()
    tokens = []
    for first in range(0, len(prompts), args.batch_size):
        rows = slice(first, first + args.batch_size)
        tokens += peft_generate(model, tokenizer, prompts[rows], owners[rows], args.new_tokens)
    return time.perf_counter() - start, tokens


def run_peft_per_adapter(model, tokenizer, names, prompts, args) -> tuple[float, list]:
    model.set_adapter(names[0])
    peft_generate(model, tokenizer, prompts[:1], None, args.new_tokens)  # warm-up
    tokens: list = [None] * len(prompts)
    start = time.perf_counter()
    for slot, name in enumerate(names):
        mine = list(range(slot, len(prompts), len(names)))
        model.set_adapter(name)
        for first in range(0, len(mine), args.batch_size):
            rows = mine[first:first + args.batch_size]
            for row, out in zip(rows, peft_generate(model, tokenizer, [prompts[r] for r in rows], None, args.new_tokens)):
                tokens[row] = out
    return time.perf_counter() - start, tokens


def main(argv=None) -> int:
    import torch

    from tuneforge.models import load_model

    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    loaded = load_model(args.model, dtype="float32", device="cpu")
    tokenizer = loaded.tokenizer
    prompts = prompt_ids(tokenizer, args.requests)
    generated_per_run = args.requests * args.new_tokens
    print(f"{args.model}: {args.requests} requests x {args.new_tokens} new tokens, batch {args.batch_size}, "
          f"LoRA r={args.rank} on q,k,v,o; torch threads {torch.get_num_threads()}", flush=True)
    results = []
    with tempfile.TemporaryDirectory() as scratch:
        adapters_dir = Path(scratch)
        all_names = make_adapters(loaded.model, adapters_dir, max(args.adapters), args.rank)
        peft_base = load_model(args.model, dtype="float32", device="cpu").model if any(w.startswith("peft") for w in args.ways) else None
        for count in args.adapters:
            names = all_names[:count]
            row = {"adapters": count}
            tuneforge_tokens = per_adapter_tokens = None
            if "tuneforge" in args.ways:
                seconds, tuneforge_tokens = best_of(args.repeats, run_tuneforge, loaded.model, tokenizer, adapters_dir,
                                                    names, prompts, args)
                row["tuneforge"] = measured(count, "tuneforge", generated_per_run, seconds)
            if peft_base is not None:
                model = peft_model(peft_base, adapters_dir, names)
                if "peft-mixed" in args.ways:
                    seconds, _ = best_of(args.repeats, run_peft_mixed, model, tokenizer, names, prompts, args)
                    row["peft-mixed"] = measured(count, "peft-mixed", generated_per_run, seconds)
                if "peft-per-adapter" in args.ways:
                    seconds, per_adapter_tokens = best_of(args.repeats, run_peft_per_adapter, model, tokenizer, names,
                                                          prompts, args)
                    row["peft-per-adapter"] = measured(count, "peft-per-adapter", generated_per_run, seconds)
                peft_base = model.unload()  # the plain base again, for the next adapter count
            if tuneforge_tokens and per_adapter_tokens:
                same = sum(a == b for a, b in zip(tuneforge_tokens, per_adapter_tokens))
                row["same_tokens_as_peft"] = f"{same}/{len(prompts)}"
            results.append(row)
            print(json.dumps({k: round(v, 1) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
    report(results)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


def best_of(repeats: int, run, *run_args) -> tuple[float, list]:
    """The fastest of `repeats` runs: on a shared machine the same run varies by ±20%, and the
    fastest is the one least disturbed. Every way gets the same number of tries."""
    results = [run(*run_args) for _ in range(max(1, repeats))]
    return min(results, key=lambda result: result[0])


def measured(count: int, way: str, tokens: int, seconds: float) -> float:
    print(f"  {count} adapter(s), {way}: {tokens} tokens in {seconds:.1f} s = {tokens / seconds:.1f} tokens/s", flush=True)
    return tokens / seconds


def report(results: list[dict]) -> None:
    ways = [w for w in ("tuneforge", "peft-mixed", "peft-per-adapter") if w in results[0]]
    print("\ngenerated tokens/s")
    print(f"{'adapters':>8}  " + "  ".join(f"{w:>16}" for w in ways))
    for row in results:
        print(f"{row['adapters']:>8}  " + "  ".join(f"{row[w]:>16.1f}" for w in ways))
    by_count = {row["adapters"]: row for row in results}
    if "tuneforge" in ways and 1 in by_count and 32 in by_count:
        keep = by_count[32]["tuneforge"] / by_count[1]["tuneforge"]
        print(f"tuneforge 32 adapters / 1 adapter: {keep:.2f}x (goal >= 0.7x) {'OK' if keep >= 0.7 else 'MISSED'}")
    peft_ways = [w for w in ways if w.startswith("peft")]
    if "tuneforge" in ways and peft_ways and 32 in by_count:
        best = max(by_count[32][w] for w in peft_ways)
        ratio = by_count[32]["tuneforge"] / best
        print(f"tuneforge vs best peft way at 32 adapters: {ratio:.2f}x (goal >= 3x) {'OK' if ratio >= 3 else 'MISSED'}")


if __name__ == "__main__":
    sys.exit(main())
