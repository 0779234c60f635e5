"""Continual finetuning: every method on one task stream with the same per-task budget, plus joint training.

    python bench/continual.py                                         # examples/continual_smollm2.yaml, all methods
    python bench/continual.py --methods sequential replay ewc --output runs/bench-continual
    python bench/continual.py --tiny --train-size 8 --eval-size 2 --steps 2    # smoke run on a random 2-layer Llama

Each method runs `tuneforge continual` on the config with only `method` and `output_dir` changed, so
every method trains the same tasks, in the same order, for the same steps per task (joint training:
the stream's total budget on all tasks at once). Printed and written to <output>/summary.json and
<output>/summary.md: each method's R matrix, average accuracy, BWT, forgetting, FWT and probe-loss
drift, and the issue's goal: the best method keeps BWT >= -2 points with average accuracy >= 90% of
joint training's, next to sequential finetuning's forgetting.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

DEFAULT_METHODS = {
    "sequential": {"name": "sequential"},
    "replay": {"name": "replay", "fraction": 0.1},
    "ewc": {"name": "ewc", "strength": 1000.0},
    "olora": {"name": "olora", "orthogonality": 0.5},
    "inflora": {"name": "inflora", "energy": 0.95},
    "migu": {"name": "migu", "top_fraction": 0.5},
    "task_adapters": {"name": "task_adapters"},
    "sema_lite": {"name": "sema_lite"},
    "merge": {"name": "merge", "merge_method": "ties", "density": 0.5},
    "joint": {"name": "joint"},
}
GOAL_BWT = -0.02
GOAL_SHARE_OF_JOINT = 0.9


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(Path(__file__).resolve().parents[1] / "examples" / "continual_smollm2.yaml"))
    parser.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS), choices=list(DEFAULT_METHODS))
    parser.add_argument("--output", default="runs/bench-continual")
    parser.add_argument("--stream", help="override the config's stream (synthetic4, mixed4)")
    parser.add_argument("--steps", type=int, help="override train.training.max_steps (steps per task)")
    parser.add_argument("--train-size", type=int, help="override train_size")
    parser.add_argument("--eval-size", type=int, help="override eval_size")
    parser.add_argument("--tiny", action="store_true", help="a random 2-layer Llama with the config model's tokenizer")
    parser.add_argument("--resume", action="store_true", help="continue methods whose streams are unfinished")
    return parser.parse_args(argv)


def tiny_model(model_name: str):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from tuneforge.models.resolve import load_tokenizer

    tokenizer = load_tokenizer(model_name)
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=512)
    return LlamaForCausalLM(config).eval(), tokenizer


def method_config(base: dict, method: str, args) -> dict:
    config = copy.deepcopy(base)
    config["method"] = DEFAULT_METHODS[method]
    config["output_dir"] = str(Path(args.output) / method)
    if args.stream:
        config.pop("tasks", None)
        config["stream"] = args.stream
    if args.steps:
        config.setdefault("train", {}).setdefault("training", {})["max_steps"] = args.steps
    if args.train_size:
        config["train_size"] = args.train_size
    if args.eval_size:
        config["eval_size"] = args.eval_size
    return config


def run_method(config: dict, args) -> dict:
    from tuneforge.continual import run_continual

    finished = Path(config["output_dir"]) / "report.json"
    if finished.is_file() and json.loads(finished.read_text()).get("complete"):
        return json.loads(finished.read_text())  # a rerun skips methods already measured
    model = tiny_model(config["train"].get("model", "smollm2-135m")) if args.tiny else None
    resume = args.resume and Path(config["output_dir"]).exists()
    return run_continual(config, source=args.config, resume=resume, overwrite=not resume, model_and_tokenizer=model,
                         say=lambda text: print(f"  {text}", file=sys.stderr))


def goal_line(rows: dict) -> str:
    joint = rows.get("joint", {}).get("metrics", {}).get("average_accuracy")
    candidates = {name: row["metrics"] for name, row in rows.items() if name != "joint" and "backward_transfer" in row.get("metrics", {})}
    if not candidates:
        return "goal: no sequential method finished"
    best = max(candidates, key=lambda name: candidates[name]["average_accuracy"])
    metrics = candidates[best]
    share = metrics["average_accuracy"] / joint if joint else float("nan")
    met = metrics["backward_transfer"] >= GOAL_BWT and joint is not None and share >= GOAL_SHARE_OF_JOINT
    sequential = candidates.get("sequential", {}).get("forgetting")
    return (f"goal (BWT >= {100 * GOAL_BWT:+.0f} points and ACC >= {100 * GOAL_SHARE_OF_JOINT:.0f}% of joint): "
            f"best method {best}: ACC {100 * metrics['average_accuracy']:.1f}%, BWT {100 * metrics['backward_transfer']:+.1f}, "
            f"{100 * share:.0f}% of joint -> {'met' if met else 'not met'}"
            + (f"; sequential forgetting {100 * sequential:.1f} points" if sequential is not None else ""))


def markdown(rows: dict, seconds: dict) -> str:
    lines = ["| method | ACC % | BWT | forgetting | FWT | probe drift | minutes |", "|---|---|---|---|---|---|---|"]
    for name, report in rows.items():
        metrics = report.get("metrics", {})
        cells = [f"{100 * metrics[key]:+.1f}" if key in metrics else "-"
                 for key in ("backward_transfer", "forgetting", "forward_transfer")]
        drift = report["probe"].get("drift")
        lines.append(f"| {name} | {100 * metrics.get('average_accuracy', float('nan')):.1f} | " + " | ".join(cells)
                     + f" | {'-' if drift is None else f'{drift:+.3f}'} | {seconds[name] / 60:.1f} |")
    lines.append("")
    for name, report in rows.items():
        lines.append(f"R ({name}; rows: after each stage, columns: {', '.join(report['tasks'])}; base: "
                     f"{[round(100 * v, 1) for v in report['baseline_accuracy'] or []]})")
        lines += [f"    {[round(100 * v, 1) for v in row]}" for row in report["R"]]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    import yaml

    args = parse_args(argv)
    base = yaml.safe_load(Path(args.config).read_text())
    rows, seconds = {}, {}
    for method in args.methods:
        print(f"method {method}", file=sys.stderr)
        start = time.perf_counter()
        rows[method] = run_method(method_config(base, method, args), args)
        seconds[method] = time.perf_counter() - start
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    summary = {"config": args.config, "tiny": args.tiny, "seconds": seconds, "goal": goal_line(rows),
               "methods": {name: {"R": r["R"], "baseline": r["baseline_accuracy"], "metrics": r.get("metrics"),
                                  "probe": r["probe"]} for name, r in rows.items()}}
    (output / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (output / "summary.md").write_text(markdown(rows, seconds) + "\n" + summary["goal"] + "\n")
    print(json.dumps(summary, indent=2))
    print(markdown(rows, seconds))
    print(summary["goal"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
