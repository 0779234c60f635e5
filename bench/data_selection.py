"""Data selection: does training on a strategy's 30% of a noisy mixture match training on all of it?

The bench builds its own noisy mixture from the bundled tasks with gold answers (``arithmetic``,
``state_tracking``) and injects three kinds of noise, each a stated fraction of the clean count:

- near-duplicates: a clean example again with its question re-cased, re-spaced and re-punctuated;
- wrong answers: a clean question with a wrong gold reply (a number off by 1-5, another box);
- off-task text: chatterbot dialogues (bundled), unrelated to either task.

Rows: ``full`` (all of the mixture), ``random`` (a seeded 30%), and each strategy's 30% (pipelines
included). Every row trains a fresh LoRA on its examples through the real trainer
(``tuneforge.train.train``) for the same number of epochs, so a 30% row takes ~30% of the steps;
then greedy exact match on the tasks' held-out problems. Selection time is the strategy's own time
(scores are not cached between rows; loading the base model is not counted); total time is selection
plus training. The report also counts which injected examples each strategy kept. Dedup rows use
``--dedup-threshold`` (default 1.0): distinct problems of the templated tasks are lexically close.

    python bench/data_selection.py                                  # smollm2-135m, the real measurement
    python bench/data_selection.py --model tiny --size 40 --epochs 1 --eval-examples 4   # smoke test
    python bench/data_selection.py --report-only                    # rebuild the report from the JSONL

Resumable: each finished row is a JSON line in ``<output-dir>/data_selection.jsonl`` keyed by its
settings; a rerun skips finished rows. Writes ``data_selection.md`` and ``data_selection.png``.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import random
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

TASKS = ("arithmetic", "state_tracking")
STRATEGIES = ("length", "dedup", "perplexity", "ifd", "el2n", "diversity", "delift", "dedup+perplexity",
              "dedup+perplexity+diversity")
MAX_SEQ_LEN = 256
MAX_NEW_TOKENS = 8
RESULTS = "data_selection.jsonl"
KINDS = ("clean", "near_duplicate", "wrong_answer", "off_task")


# ---------------------------------------------------------------------------------------------
# The noisy mixture


@dataclass
class MixtureItem:
    example: object  # tuneforge.data.Example
    kind: str


def build_mixture(size: int, near_duplicates: float, wrong_answers: float, off_task: float, seed: int) -> list[MixtureItem]:
    """``size`` clean examples per task, plus the injected fractions (of the clean count), shuffled."""
    from tuneforge.data import get_dataset

    rng = random.Random(seed)
    clean = [e for task in TASKS for e in get_dataset(task, split="train", size=size, seed=seed)]
    items = [MixtureItem(e, "clean") for e in clean]
    items += [MixtureItem(near_duplicate(rng.choice(clean), rng), "near_duplicate") for _ in range(round(near_duplicates * len(clean)))]
    items += [MixtureItem(wrong_answer(rng.choice(clean), rng), "wrong_answer") for _ in range(round(wrong_answers * len(clean)))]
    dialogues = [e for e in get_dataset("chatterbot", split="train") if len(e.messages) == 2]
    items += [MixtureItem(rng.choice(dialogues), "off_task") for _ in range(round(off_task * len(clean)))]
    rng.shuffle(items)
    return items


def near_duplicate(example, rng: random.Random):
    """The same problem, written slightly differently: what a scraped or merged dataset repeats."""
    question = example.messages[0].content
    edits = [lambda q: q.lower(), lambda q: q.replace(" ", "  ", 2), lambda q: q.replace(".", " .", 1),
             lambda q: q.rstrip(".?") + " ?", lambda q: "  " + q]
    for edit in rng.sample(edits, 2):
        question = edit(question)
    return _with_turns(example, question, example.messages[1].content)


def wrong_answer(example, rng: random.Random):
    gold = example.messages[1].content
    match = re.fullmatch(r"(box )?(\d+)", gold)
    if match is None:
        wrong = gold[::-1]
    elif match.group(1):  # "box N": another box of the three to five
        wrong = f"box {rng.choice([n for n in range(1, 6) if str(n) != match.group(2)])}"
    else:
        wrong = str(max(0, int(gold) + rng.choice([-5, -4, -3, -2, -1, 1, 2, 3, 4, 5])))
        wrong = wrong if wrong != gold else str(int(gold) + 1)
    return _with_turns(example, example.messages[0].content, wrong)


def _with_turns(example, question: str, reply: str):
    from tuneforge.data.records import chat_example

    return chat_example([("user", question), ("assistant", reply)], origin=example.origin, answer=reply)


def held_out(eval_examples: int):
    from tuneforge.data import get_dataset

    return [e for task in TASKS for e in get_dataset(task, split="eval")[:eval_examples]]


# ---------------------------------------------------------------------------------------------
# One row


def load_base(model_name: str, device: str):
    if model_name == "tiny":
        return _method_comparison_bench().build_tiny_model_and_tokenizer()
    from tuneforge.models import load_model

    loaded = load_model(model_name, device=device)
    return loaded.model, loaded.tokenizer


def _method_comparison_bench():
    """The tiny model of bench/method_comparison.py, so both benches smoke-test on the same one."""
    path = Path(__file__).with_name("method_comparison.py")
    spec = importlib.util.spec_from_file_location("method_comparison_bench", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def select_rows(row: str, mixture: list[MixtureItem], options, model, tokenizer) -> tuple[list[int], float]:
    """(indices kept, selection seconds) for one row."""
    from tuneforge.select import Pool, SelectContext, plan_selection, run_selection
    from tuneforge.select.scoring.model import ScoringModel

    if row == "full":
        return list(range(len(mixture))), 0.0
    pool = Pool([item.example for item in mixture], source="noisy mixture")
    scorer = ScoringModel(model, tokenizer, options.model, batch_size=options.score_batch_size, max_seq_len=MAX_SEQ_LEN)
    stages = row.split("+")
    strategy_options = {**({"warmup_steps": options.warmup_steps} if "el2n" in stages else {}),
                        **({"threshold": options.dedup_threshold} if "dedup" in stages else {})}
    plan = plan_selection(pool, row, options.fraction, strategy_options)
    result = run_selection(pool, plan, SelectContext(seed=options.seed, load_scorer=lambda: scorer,
                                                     device=str(next(model.parameters()).device)))
    return result.selection.kept, result.seconds


def train_and_score(row: str, kept: list[int], mixture: list[MixtureItem], options, model, tokenizer) -> dict:
    from tuneforge.config import parse_train_config
    from tuneforge.eval.generation import score_generation
    from tuneforge.select.pool import example_record
    from tuneforge.train import train

    work = Path(options.work_dir) / _slug(row)
    work.mkdir(parents=True, exist_ok=True)
    data = work / "train.jsonl"
    data.write_text("".join(json.dumps(example_record(mixture[i].example)) + "\n" for i in kept), encoding="utf-8")
    config = parse_train_config({
        "model": options.model, "device": options.device, "output_dir": str(work / "run"),
        "adapter": {"method": "lora", "r": 16, "alpha": 32},
        "data": {"train": str(data), "max_seq_len": MAX_SEQ_LEN, "eval_size": 0},
        "training": {"epochs": options.epochs, "batch_size": options.batch_size, "lr": options.lr,
                     "seed": options.seed, "log_every": 10},
    }, source=f"benchmark row {row!r}")
    start = time.perf_counter()
    summary = train(config, overwrite=True, model_and_tokenizer=(model, tokenizer))
    train_seconds = time.perf_counter() - start
    score = score_generation(model, tokenizer, held_out(options.eval_examples), max_new_tokens=MAX_NEW_TOKENS,
                             progress=False)
    return {"train_seconds": train_seconds, "steps": summary.steps, "exact_match": score.exact_match}


def measure_row(row: str, mixture: list[MixtureItem], options) -> dict:
    import torch

    from tuneforge.train.strategy import resolve_device

    torch.manual_seed(options.seed)
    device = resolve_device(options.device)
    model, tokenizer = load_base(options.model, str(device))
    model.to(device)
    kept, selection_seconds = select_rows(row, mixture, options, model, tokenizer)
    kinds = {kind: sum(mixture[i].kind == kind for i in kept) for kind in KINDS}
    measured = train_and_score(row, kept, mixture, options, model, tokenizer)
    return {"row": row, "kept": len(kept), "kept_by_kind": kinds, "selection_seconds": selection_seconds,
            "selection_seconds_per_1k": 1000 * selection_seconds / len(mixture), **measured,
            "total_seconds": selection_seconds + measured["train_seconds"], "device": str(device)}


def _slug(row: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", row.lower())


# ---------------------------------------------------------------------------------------------
# Results and report


def settings_key(row: str, options) -> str:
    settings = {k: getattr(options, k) for k in ("model", "size", "near_duplicates", "wrong_answers", "off_task",
                                                  "fraction", "epochs", "batch_size", "lr", "eval_examples", "seed",
                                                  "warmup_steps", "dedup_threshold")}
    return hashlib.sha256(json.dumps({"row": row, **settings}, sort_keys=True).encode()).hexdigest()[:16]


def read_results(path: Path) -> dict[str, dict]:
    if not path.exists():
        return {}
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {row["key"]: row for row in rows}


def append_result(path: Path, record: dict) -> None:
    import os

    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as handle:
        handle.write(json.dumps(record) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def write_report(rows: list[dict], mixture_counts: dict, options, output_dir: Path) -> Path:
    from tuneforge.fileio import atomic_write_text

    full = next((r for r in rows if r["row"] == "full"), None)
    random_row = next((r for r in rows if r["row"] == "random"), None)
    lines = ["# Data selection on a noisy mixture", "",
             f"Model `{options.model}`; tasks {', '.join(TASKS)} ({options.size} clean training examples each). Injected, "
             f"as fractions of the clean count: near-duplicates {options.near_duplicates}, wrong answers "
             f"{options.wrong_answers}, off-task dialogues {options.off_task}. Mixture: "
             + ", ".join(f"{k} {v}" for k, v in mixture_counts.items()) + ".",
             f"Each row trains LoRA (r=16) for {options.epochs} epoch(s) on its examples; exact match on "
             f"{options.eval_examples} held-out problems per task. Device: {rows[0]['device'] if rows else '-'}.", "",
             "| row | kept | clean / dup / wrong / off-task kept | exact match | vs random | selection s | s per 1k | train s | total vs full |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        kinds = " / ".join(str(r["kept_by_kind"][k]) for k in KINDS)
        versus = f"{100 * (r['exact_match'] - random_row['exact_match']):+.1f}" if random_row else "-"
        ratio = f"{r['total_seconds'] / full['total_seconds']:.2f}x" if full else "-"
        lines.append(f"| {r['row']} | {r['kept']} | {kinds} | {100 * r['exact_match']:.1f}% | {versus} | "
                     f"{r['selection_seconds']:.1f} | {r['selection_seconds_per_1k']:.1f} | {r['train_seconds']:.1f} | {ratio} |")
    lines += ["", goals(rows, full, random_row), "", "![accuracy against total time](data_selection.png)", ""]
    plot(rows, output_dir / "data_selection.png")
    return atomic_write_text(output_dir / "data_selection.md", "\n".join(lines))


def goals(rows: list[dict], full: dict | None, random_row: dict | None) -> str:
    candidates = [r for r in rows if r["row"] not in ("full", "random")]
    if not candidates or full is None or random_row is None:
        return "Goals: not assessed (the full, random and strategy rows are all needed)."
    best = max(candidates, key=lambda r: (r["exact_match"], -r["total_seconds"]))
    matches = best["exact_match"] >= full["exact_match"]
    cheap = best["total_seconds"] <= 0.4 * full["total_seconds"]
    beats_random = best["exact_match"] - random_row["exact_match"] >= 0.05
    return (f"Goals, for the best strategy row (`{best['row']}`): matches or beats full-data accuracy: "
            f"{'yes' if matches else 'no'}; at <= 0.4x the full run's total time: {'yes' if cheap else 'no'} "
            f"({best['total_seconds'] / full['total_seconds']:.2f}x); beats random 30% by >= 5 points: "
            f"{'yes' if beats_random else 'no'} ({100 * (best['exact_match'] - random_row['exact_match']):+.1f}).")


def plot(rows: list[dict], path: Path) -> None:
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from tuneforge.fileio import atomic_write

    figure, axes = plt.subplots(figsize=(7, 4.5))
    for r in rows:
        axes.scatter(r["total_seconds"], 100 * r["exact_match"], color="tab:red" if r["row"] in ("full", "random") else "tab:blue")
        axes.annotate(r["row"], (r["total_seconds"], 100 * r["exact_match"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    axes.set_xlabel("selection + training time (s)")
    axes.set_ylabel("held-out exact match (%)")
    axes.set_title("Data selection on a noisy mixture")
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    plt.close(figure)
    atomic_write(path, lambda tmp: tmp.write_bytes(buffer.getvalue()))


# ---------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m", help="base model, or 'tiny' for a smoke test")
    parser.add_argument("--size", type=int, default=1000, help="clean training examples per task")
    parser.add_argument("--near-duplicates", type=float, default=0.3)
    parser.add_argument("--wrong-answers", type=float, default=0.2)
    parser.add_argument("--off-task", type=float, default=0.2)
    parser.add_argument("--fraction", type=float, default=0.3, help="budget of every selection row")
    parser.add_argument("--strategies", default=",".join(STRATEGIES), help="comma-separated strategy rows")
    parser.add_argument("--epochs", type=float, default=2.0)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--score-batch-size", type=int, default=32)
    parser.add_argument("--warmup-steps", type=int, default=30, help="el2n's warm-up run")
    parser.add_argument("--dedup-threshold", type=float, default=1.0,
                        help="dedup's Jaccard threshold; the tasks are templated (distinct state_tracking problems "
                             "reach 0.9+), and the injected near-duplicates normalise to exact copies")
    parser.add_argument("--eval-examples", type=int, default=100, help="held-out problems per task")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output-dir", default=str(Path(__file__).resolve().parents[1] / "docs"))
    parser.add_argument("--work-dir", default="runs/data_selection")
    parser.add_argument("--report-only", action="store_true")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> list[dict]:
    options = parse_args(argv)
    output_dir = Path(options.output_dir)
    results_path = output_dir / RESULTS
    mixture = build_mixture(options.size, options.near_duplicates, options.wrong_answers, options.off_task, options.seed)
    counts = {kind: sum(item.kind == kind for item in mixture) for kind in KINDS}
    row_names = ["full", "random", *[s.strip() for s in options.strategies.split(",") if s.strip()]]
    done = read_results(results_path)
    rows = []
    for row in row_names:
        key = settings_key(row, options)
        if key not in done and not options.report_only:
            print(f"[data_selection] {row} …", flush=True)
            record = {"key": key, **measure_row(row, mixture, options)}
            append_result(results_path, record)
            done[key] = record
        if key in done:
            rows.append(done[key])
    if rows:
        write_report(rows, counts, options, output_dir)
    return rows


if __name__ == "__main__":
    main()
