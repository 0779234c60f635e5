"""LoftQ vs plain QLoRA at initialisation: how far from the float model does each start?

Plain QLoRA starts from the 4-bit base with B = 0, so its starting model *is* the quantized model.
LoftQ (Li et al. 2023, ``adapter.init=loftq``) chooses the 4-bit base Q and the LoRA start together so
that Q + s·B·A ≈ W. On smollm2-135m, NF4 on every decoder Linear (lm_head kept in float32) and LoRA
r=16 (alpha 32) on all of them, this measures, before any optimizer step:

    weight error   mean over the adapted layers of ||W - (Q + s·B·A)||_F / ||W||_F
    initial loss   mean loss per answer token on held-out ``arithmetic`` problems (the eval split),
                   beside the float model's loss on the same tokens

Every row quantizes the same way, blocksize 64 without double quantization, because LoftQ's Q is
defined on those blocks (``adapters/lora/inits/loftq.py``); the rows differ only in the adapter's start.
LoftQ's Q is turned into real 4-bit layers (``quant.quantize_model``) before anything is measured.

    python bench/loftq_init.py                                  # QLoRA, LoftQ 1 and 5 iters (~4 min, 1 core)
    python bench/loftq_init.py --iters 1 2 5 --examples 64 --json loftq.json
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import shlex
import sys
import time

import torch
from torch import nn

RANK, ALPHA = 16, 32
DATASET = "arithmetic"
MAX_SEQ_LEN = 256
# Q must be exactly LoftQ's grid: its blocks (64 values, one float32 absmax each), no double quant.
QUANTIZATION = dict(bits=4, quant_type="nf4", blocksize=64, double_quant=False, compute_dtype=torch.float32,
                    skip_modules=["lm_head"])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m", help="base model (default smollm2-135m)")
    parser.add_argument("--iters", type=int, nargs="+", default=[1, 5], metavar="N",
                        help="loftq_iters values, one row each (default: 1 5)")
    parser.add_argument("--examples", type=int, default=32, metavar="N", help="held-out problems for the loss (default 32)")
    parser.add_argument("--batch-size", type=int, default=8, metavar="N", help="problems per forward pass (default 8)")
    parser.add_argument("--json", default=None, metavar="FILE", help="also write the results here")
    args = parser.parse_args(argv)
    if args.examples < 1 or args.batch_size < 1 or min(args.iters) < 1:
        parser.error(f"--examples {args.examples}, --batch-size {args.batch_size} and --iters {args.iters} "
                     "must all be positive")
    return args


def held_out_batches(tokenizer, count: int, batch_size: int) -> list[dict[str, torch.Tensor]]:
    """The first ``count`` eval-split problems, tokenized as training does (loss on answers only)."""
    from tuneforge.data import collate_padded, get_dataset, tokenize_examples

    examples = get_dataset(DATASET, split="eval", size=count)
    tokenized = tokenize_examples(examples, tokenizer, max_seq_len=MAX_SEQ_LEN)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0  # padding is masked anyway
    return [collate_padded(tokenized[i:i + batch_size], pad_id) for i in range(0, len(tokenized), batch_size)]


@torch.no_grad()  # only the starting point is measured: no graph through the adapters
def initial_loss(model: nn.Module, batches: list[dict[str, torch.Tensor]]) -> float:
    from tuneforge.eval.loss import evaluate_loss

    return evaluate_loss(model, batches)


def build_start(float_model: nn.Module, loftq_iters: int | None) -> nn.Module:
    """The model a run starts from: plain QLoRA (None) quantizes, then adds LoRA with B = 0; LoftQ
    adds LoRA first (its init writes Q into the base weight), then makes Q real 4-bit layers."""
    from tuneforge.adapters import LoraConfig, add_adapter
    from tuneforge.quant import quantize_model

    model = copy.deepcopy(float_model)
    if loftq_iters is None:
        quantize_model(model, **QUANTIZATION)
        add_adapter(model, LoraConfig(r=RANK, alpha=ALPHA, target_modules="all-linear"))
    else:
        add_adapter(model, LoraConfig(r=RANK, alpha=ALPHA, target_modules="all-linear", init="loftq",
                                      loftq_iters=loftq_iters))
        quantize_model(model, **QUANTIZATION)
    return model.eval()


@torch.no_grad()
def weight_error(start: nn.Module, float_model: nn.Module) -> tuple[float, int]:
    """(mean relative Frobenius error of Q + s·B·A against W over the adapted layers, their count)."""
    from tuneforge.adapters.model import wrapped_layers
    from tuneforge.quant import QuantLinear

    errors = []
    for name, layer in wrapped_layers(start):
        if not isinstance(layer.base_layer, QuantLinear):
            raise SystemExit(f"{name} is not quantized ({type(layer.base_layer).__name__}); the comparison needs a 4-bit base")
        original = float_model.get_submodule(name).weight.float()  # (out, in)
        adapter = layer.adapters["default"]
        approximation = layer.base_layer.weight.float() + adapter.delta_weight(layer.base_layer).float()
        errors.append(float((original - approximation).norm() / original.norm()))
    return sum(errors) / len(errors), len(errors)


def measure_start(label: str, float_model: nn.Module, batches, loftq_iters: int | None) -> dict:
    started = time.perf_counter()
    start = build_start(float_model, loftq_iters)
    init_seconds = time.perf_counter() - started
    error, layers = weight_error(start, float_model)
    row = {"start": label, "loftq_iters": loftq_iters, "weight_error": error, "adapted_layers": layers,
           "initial_loss": initial_loss(start, batches), "init_seconds": init_seconds}
    print(f"  {label}: weight error {error:.4f}, loss {row['initial_loss']:.4f} ({init_seconds:.0f} s to build)",
          file=sys.stderr)
    return row


def render_markdown(rows: list[dict], float_loss: float, args: argparse.Namespace, command: str) -> str:
    lines = [
        f"LoftQ vs plain QLoRA at step 0 on **{args.model}**: NF4 (blocksize 64, no double quant) on every decoder "
        f"Linear, lm_head in float32; LoRA r={RANK}, alpha={ALPHA} on all {rows[0]['adapted_layers']} of them. "
        f"Loss: mean per answer token on the first {args.examples} `{DATASET}` eval-split problems.",
        "",
        "| start | mean ‖W − (Q + s·BA)‖ / ‖W‖ | initial loss | loss − float loss | build time (s) |",
        "|---|---|---|---|---|",
        f"| float base (no quantization) | 0 | {float_loss:.4f} | 0 | – |",
    ]
    for row in rows:
        lines.append(f"| {row['start']} | {row['weight_error']:.4f} | {row['initial_loss']:.4f} | "
                     f"{row['initial_loss'] - float_loss:+.4f} | {row['init_seconds']:.0f} |")
    lines += ["", f"Command: `{command}`; {platform.machine()}, torch {torch.__version__}, "
                  f"{torch.get_num_threads()} thread(s)."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    from tuneforge.models import load_model

    args = parse_args(argv)
    command = "python " + shlex.join(["bench/loftq_init.py", *(sys.argv[1:] if argv is None else argv)])
    loaded = load_model(args.model, dtype="float32", device="cpu")
    float_model, tokenizer = loaded.model.eval(), loaded.tokenizer
    batches = held_out_batches(tokenizer, args.examples, args.batch_size)
    float_loss = initial_loss(float_model, batches)
    print(f"  float base: loss {float_loss:.4f}", file=sys.stderr)
    rows = [measure_start("plain QLoRA (B = 0)", float_model, batches, None)]
    rows += [measure_start(f"LoftQ, {n} iter{'s' if n > 1 else ''}", float_model, batches, n) for n in args.iters]
    print(render_markdown(rows, float_loss, args, command))
    results = {"model": args.model, "examples": args.examples, "rank": RANK, "alpha": ALPHA,
               "quantization": {k: str(v) if isinstance(v, torch.dtype) else v for k, v in QUANTIZATION.items()},
               "float_loss": float_loss, "rows": rows, "command": command}
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(results, handle, indent=2)
    return results


if __name__ == "__main__":
    main()
