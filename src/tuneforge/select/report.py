"""What a selection leaves behind: the kept examples as JSONL, and a report of every decision.

report/
  selection.csv    one row per example: index, origin, kept, score, reason, previews
  selection.md     counts, time per 1k examples per stage, and the first kept and dropped rows
  scores.png       histogram of the scores, kept and dropped stacked
  summary.json     strategy, budget, sizes, timings, and stage details (e.g. dedup clusters)
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np

from tuneforge.fileio import atomic_write, atomic_write_json, atomic_write_text
from tuneforge.select.pool import Pool, example_record, instruction_text, response_text
from tuneforge.select.run import SelectionResult

PREVIEW_CHARS = 80
SHOWN_ROWS = 15


def write_selected(path: str | Path, result: SelectionResult, pool: Pool) -> Path:
    kept = result.selection.kept_examples(pool.examples)
    return atomic_write_text(path, "".join(json.dumps(example_record(e), ensure_ascii=False) + "\n" for e in kept))


def write_report(report_dir: str | Path, result: SelectionResult, pool: Pool) -> Path:
    directory = Path(report_dir)
    rows = decision_rows(result, pool)
    atomic_write_text(directory / "selection.csv", _csv(rows))
    atomic_write_text(directory / "selection.md", _markdown(result, rows))
    atomic_write_json(directory / "summary.json", summary(result, pool))
    if result.selection.scores is not None and np.isfinite(result.selection.scores).any():
        plot_histogram(directory / "scores.png", result)
    return directory


def decision_rows(result: SelectionResult, pool: Pool) -> list[dict]:
    selection = result.selection
    kept = set(selection.kept)
    examples = selection.examples or pool.examples
    rows = []
    for i, example in enumerate(examples):
        score = selection.scores[i] if selection.scores is not None else float("nan")
        rows.append({"index": i + 1, "origin": str(example.origin or ""), "kept": i in kept,
                     "score": "" if np.isnan(score) else f"{score:.6g}", "reason": selection.reasons[i],
                     "instruction": _preview(instruction_text(example)), "reply": _preview(response_text(example))})
    return rows


def summary(result: SelectionResult, pool: Pool) -> dict:
    return {
        "strategy": result.plan.strategy, "budget": result.plan.budget, "options": result.plan.options,
        "pool_size": len(pool), "kept": len(result.selection.kept), "score": result.selection.score_name,
        "seconds": result.seconds,
        "stages": [{"strategy": t.strategy, "examples_in": t.examples_in, "examples_out": t.examples_out,
                    "seconds": t.seconds, "seconds_per_1k_examples": t.seconds_per_1k} for t in result.timings],
        "details": result.selection.details,
    }


def plot_histogram(path: Path, result: SelectionResult) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scores = result.selection.scores
    kept_mask = np.zeros(len(scores), dtype=bool)
    kept_mask[result.selection.kept] = True
    finite = np.isfinite(scores)
    figure, axes = plt.subplots(figsize=(7, 4))
    bins = np.histogram_bin_edges(scores[finite], bins=40)
    axes.hist([scores[finite & kept_mask], scores[finite & ~kept_mask]], bins=bins, stacked=True,
              label=[f"kept ({int((finite & kept_mask).sum())})", f"dropped ({int((finite & ~kept_mask).sum())})"],
              color=["tab:green", "tab:gray"])
    axes.set_xlabel(result.selection.score_name)
    axes.set_ylabel("examples")
    axes.set_title(f"tuneforge select --strategy {result.plan.strategy}")
    axes.legend()
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    plt.close(figure)
    return atomic_write(path, lambda tmp: tmp.write_bytes(buffer.getvalue()))


def _csv(rows: list[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]) if rows else ["index"])
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def _markdown(result: SelectionResult, rows: list[dict]) -> str:
    lines = [f"# Selection: {result.plan.strategy}", "",
             f"Kept {len(result.selection.kept)} of {len(rows)} examples (budget {result.plan.budget}); "
             f"{result.seconds:.2f} s in all.", "", "| stage | in | out | seconds | s per 1k examples |",
             "|---|---:|---:|---:|---:|"]
    lines += [f"| {t.strategy} | {t.examples_in} | {t.examples_out} | {t.seconds:.2f} | {t.seconds_per_1k:.2f} |"
              for t in result.timings]
    for title, wanted in (("Kept", True), ("Dropped", False)):
        chosen = [row for row in rows if row["kept"] is wanted]
        lines += ["", f"## {title} ({len(chosen)}; first {min(SHOWN_ROWS, len(chosen))}, all in selection.csv)", "",
                  "| # | score | reason | instruction | reply |", "|---:|---:|---|---|---|"]
        lines += [f"| {r['index']} | {r['score']} | {_cell(r['reason'])} | {_cell(r['instruction'])} | {_cell(r['reply'])} |"
                  for r in chosen[:SHOWN_ROWS]]
    return "\n".join(lines) + "\n"


def _preview(text: str) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= PREVIEW_CHARS else flat[: PREVIEW_CHARS - 1] + "…"


def _cell(text: str) -> str:
    return text.replace("|", "\\|")
