"""The short summary printed (and saved as ``summary.json``) at the end of a run."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table

from tuneforge.fileio import atomic_write_json


@dataclass
class RunSummary:
    run_dir: Path
    adapter_dir: Path
    steps: int
    train_seconds: float
    tokens_per_second: float
    peak_memory_mb: float
    final_train_loss: float | None
    best_eval_loss: float | None
    trainable_params: int
    total_params: int
    interrupted: bool = False
    nonfinite_steps: int = 0  # steps skipped for a NaN/inf loss or gradient norm


def save_summary(summary: RunSummary) -> None:
    atomic_write_json(summary.run_dir / "summary.json", {k: str(v) if hasattr(v, "parts") else v for k, v in asdict(summary).items()})


def print_summary(summary: RunSummary, console: Console | None = None) -> None:
    console = console or Console()
    table = Table(title="training summary", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    rows = [
        ("steps", f"{summary.steps}" + (" (interrupted)" if summary.interrupted else "")),
        ("time", f"{summary.train_seconds:.1f} s"),
        ("tokens/s", f"{summary.tokens_per_second:,.0f}"),
        ("peak memory", f"{summary.peak_memory_mb:,.0f} MiB"),
        ("final train loss", _fmt(summary.final_train_loss)),
        ("best eval loss", _fmt(summary.best_eval_loss)),
        *([("skipped steps", f"{summary.nonfinite_steps} (non-finite loss or gradient norm)")] if summary.nonfinite_steps else []),
        ("trainable params", f"{summary.trainable_params:,} of {summary.total_params:,}"),
        ("model" if summary.adapter_dir.name == "model" else "adapter", str(summary.adapter_dir)),  # full FT: model/
        ("loss curve", str(summary.run_dir / "loss_curve.png")),
    ]
    for key, value in rows:
        table.add_row(key, value)
    console.print(table)


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"
