"""What a run leaves for the user: ``metrics.jsonl``, TensorBoard events and a loss-curve PNG."""

from __future__ import annotations

import json
from pathlib import Path

from tuneforge.errors import TuneforgeError
from tuneforge.fileio import atomic_write

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "loss_curve.png"
OBJECTIVE_PLOT_FILE = "objective_metrics.png"
# The preference and reward objectives' metrics, one panel each where a run logged them.
OBJECTIVE_PANELS = (
    ("implicit rewards (beta-scaled log-ratios)", ("reward_chosen", "reward_rejected", "reward_desirable", "reward_undesirable")),
    ("reward margin (chosen - rejected)", ("reward_margin",)),
    ("preference accuracy", ("preference_accuracy",)),
    ("mean reward (GRPO; eval: greedy replies)", ("reward",)),
    ("KL to the reference", ("kl",)),
)


class MetricsLog:
    """Appends one JSON object per line; on resume, drops lines from steps after the checkpoint."""

    def __init__(self, run_dir: Path, resume_step: int | None = None):
        self.path = run_dir / METRICS_FILE
        if resume_step is not None and self.path.exists():
            kept = [line for line in read_metrics(self.path) if line.get("step", 0) <= resume_step]
            atomic_write(self.path, lambda tmp: tmp.write_text("".join(json.dumps(r) + "\n" for r in kept)))
        elif resume_step is None and self.path.exists():
            self.path.unlink()
        self._tensorboard = _tensorboard_writer(run_dir / "tensorboard")

    def log(self, record: dict) -> None:
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
        if self._tensorboard is not None:
            step = record.get("step", 0)
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self._tensorboard.add_scalar(key.replace("_", "/", 1), value, step)

    def close(self) -> None:
        if self._tensorboard is not None:
            self._tensorboard.close()


class DiscardedLog:
    """The metrics log of a rank other than 0: rank 0 alone writes metrics.jsonl and TensorBoard."""

    def log(self, record: dict) -> None:
        pass

    def close(self) -> None:
        pass


def _tensorboard_writer(directory: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is a dependency, but a trimmed install should still train
        return None
    return SummaryWriter(log_dir=str(directory))


def read_metrics(path: Path) -> list[dict]:
    """The records of ``metrics.jsonl``. A torn last line (the process died mid-write) is dropped;
    a bad line anywhere else is an error naming it."""
    if not path.exists():
        return []
    lines = [(number, line) for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1)
             if line.strip()]
    records = []
    for position, (number, line) in enumerate(lines):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if position == len(lines) - 1:
                break  # torn by a crash while appending: everything before it is whole
            raise TuneforgeError(f"{path}:{number} is not a JSON line ({line[:60]!r}); delete or fix that line") from None
        if isinstance(record, dict):
            records.append(record)
    return records


def curve_series(records: list[dict]) -> dict[str, list[tuple[int, float]]]:
    """(step, value) points of each plotted metric that was measured; steps without a value skipped."""
    series = {}
    for key in ("train_loss", "eval_loss", "eval_exact_match"):
        points = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
        if points:
            series[key] = points
    return series


def plot_loss_curve(run_dir: Path) -> Path | None:
    """Train loss (and eval loss where measured) against the optimizer step; the exact match of
    ``training.eval_generate`` on a second axis."""
    series = curve_series(read_metrics(run_dir / METRICS_FILE))
    train, evals = series.get("train_loss"), series.get("eval_loss")
    if not train and not evals:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4), dpi=110)
    if train:
        axis.plot(*zip(*train), label="train loss", color="#1f77b4", linewidth=1.4)
    if evals:
        axis.plot(*zip(*evals), label="eval loss", color="#d62728", marker="o", linewidth=1.4)
    axis.set_xlabel("optimizer step")
    axis.set_ylabel("cross-entropy (nats/token)")
    axis.set_title(f"tuneforge run: {run_dir.name}")
    axis.grid(alpha=0.3)
    handles, labels = axis.get_legend_handles_labels()
    if "eval_exact_match" in series:
        accuracy = axis.twinx()
        accuracy.plot(*zip(*series["eval_exact_match"]), label="eval exact match", color="#2ca02c", marker="s", linewidth=1.4)
        accuracy.set_ylabel("exact match (fraction of eval examples)")
        accuracy.set_ylim(-0.02, 1.02)
        more_handles, more_labels = accuracy.get_legend_handles_labels()
        handles, labels = handles + more_handles, labels + more_labels
    axis.legend(handles, labels)
    figure.tight_layout()
    path = run_dir / PLOT_FILE
    atomic_write(path, lambda tmp: figure.savefig(tmp, format="png"))
    plt.close(figure)
    return path


def plot_objective_metrics(run_dir: Path) -> Path | None:
    """One panel per preference/reward metric family the run logged (train lines, and held-out
    ``eval_`` values where measured) against the optimizer step; None for runs without any (SFT)."""
    records = read_metrics(run_dir / METRICS_FILE)
    panels = []
    for title, keys in OBJECTIVE_PANELS:
        lines = []
        for key in keys:
            for name, label in ((key, f"train {key}"), (f"eval_{key}", f"eval {key}")):
                points = [(r["step"], r[name]) for r in records if isinstance(r.get(name), (int, float))]
                if points:
                    lines.append((label, points))
        if lines:
            panels.append((title, lines))
    if not panels:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(len(panels), 1, figsize=(7, 2.6 * len(panels)), dpi=110, sharex=True, squeeze=False)
    for axis, (title, lines) in zip(axes[:, 0], panels):
        for label, points in lines:
            axis.plot(*zip(*points), label=label, marker="o" if label.startswith("eval") else None, linewidth=1.3)
        axis.set_title(title, fontsize=10)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    axes[-1, 0].set_xlabel("optimizer step")
    figure.suptitle(f"tuneforge run: {run_dir.name}")
    figure.tight_layout()
    path = run_dir / OBJECTIVE_PLOT_FILE
    atomic_write(path, lambda tmp: figure.savefig(tmp, format="png"))
    plt.close(figure)
    return path
