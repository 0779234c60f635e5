"""The stream's report: report.json (R, the metrics, the probe drift), a heatmap of R and one
accuracy-over-stages line plot per task."""

from __future__ import annotations

from pathlib import Path

from tuneforge.continual import metrics
from tuneforge.fileio import atomic_write, atomic_write_json

REPORT = "report.json"


def build_report(progress: dict) -> dict:
    """The report of the stages finished so far; the metrics once R is square (every task trained)."""
    rows = [stage["accuracy"] for stage in progress["stages"]]
    baseline = progress.get("baseline", {})
    tasks = progress["tasks"]
    report = {
        "method": progress["method"], "tasks": tasks, "stages": [stage["tasks"] for stage in progress["stages"]],
        "R": rows, "baseline_accuracy": baseline.get("accuracy"),
        "probe": {"name": progress.get("probe_name"), "base_loss": baseline.get("probe_loss"),
                  "loss_after_stage": [stage["probe_loss"] for stage in progress["stages"]]},
        "complete": len(rows) == progress["planned_stages"],
    }
    if report["probe"]["base_loss"] is not None and rows:
        report["probe"]["drift"] = report["probe"]["loss_after_stage"][-1] - report["probe"]["base_loss"]
    if rows and len(rows) == len(tasks) and len(tasks) >= 2 and baseline.get("accuracy") is not None:
        report["metrics"] = metrics.summarize(rows, baseline["accuracy"])
    elif rows and report["complete"]:  # joint training: one row, average accuracy only
        report["metrics"] = {"average_accuracy": sum(rows[-1]) / len(rows[-1])}
    return report


def write_report(run_dir: Path, progress: dict, plots: bool = True) -> dict:
    """report.json, and with ``plots`` the heatmap and the per-task curves (drawn once, at the end)."""
    report = build_report(progress)
    atomic_write_json(run_dir / REPORT, report)
    if plots and report["R"]:
        plot_heatmap(report, run_dir / "accuracy_matrix.png")
        plot_task_curves(report, run_dir / "task_curves")
    return report


def plot_heatmap(report: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, tasks = report["R"], report["tasks"]
    figure, axes = plt.subplots(figsize=(1.2 * len(tasks) + 2, 0.9 * len(rows) + 1.5))
    image = axes.imshow([[100 * value for value in row] for row in rows], vmin=0, vmax=100, cmap="viridis", aspect="auto")
    for i, row in enumerate(rows):
        for j, value in enumerate(row):
            axes.text(j, i, f"{100 * value:.0f}", ha="center", va="center", color="white" if value < 0.6 else "black")
    axes.set_xticks(range(len(tasks)), tasks, rotation=30, ha="right")
    axes.set_yticks(range(len(rows)), [f"after {'+'.join(tasks[t] for t in stage)}" for stage in report["stages"]])
    axes.set_xlabel("evaluated task")
    axes.set_title(f"R[i][j]: exact match % ({report['method']})")
    figure.colorbar(image, ax=axes)
    figure.tight_layout()
    atomic_write(path, lambda tmp: figure.savefig(tmp, format="png", dpi=100))
    plt.close(figure)
    return path


def plot_task_curves(report: dict, folder: Path) -> list[Path]:
    """One plot per task: its accuracy before training (stage 0) and after each stage."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    baseline = report["baseline_accuracy"]
    for j, task in enumerate(report["tasks"]):
        values = ([baseline[j]] if baseline else []) + [row[j] for row in report["R"]]
        steps = list(range(0 if baseline else 1, len(report["R"]) + 1))
        figure, axes = plt.subplots(figsize=(5, 3))
        axes.plot(steps, [100 * v for v in values], marker="o")
        axes.set_xticks(steps)
        axes.set_xlabel("stages trained (0 = base model)")
        axes.set_ylabel("exact match %")
        axes.set_ylim(0, 100)
        axes.set_title(f"{task} ({report['method']})")
        figure.tight_layout()
        path = folder / f"{j + 1:02d}-{task}.png"
        atomic_write(path, lambda tmp, fig=figure: fig.savefig(tmp, format="png", dpi=100))
        plt.close(figure)
        paths.append(path)
    return paths
