"""The progress bar (loss, learning rate, tokens/s, ETA) and the plain log lines CI sees."""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class TrainProgress:
    def __init__(self, total_steps: int, done: int, enabled: bool = True, console: Console | None = None):
        self.console = console or Console(stderr=True)
        self.enabled = enabled
        self.total = total_steps
        self._bar = Progress(
            TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]} | lr {task.fields[lr]} | {task.fields[rate]} tok/s{task.fields[evals]}"),
            TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
            console=self.console, disable=not (enabled and self.console.is_terminal), transient=False,
        )
        self._task = self._bar.add_task("train", total=total_steps, completed=done, loss="-", lr="-", rate="-", evals="")
        self._evals = ""  # the latest evaluation's generation score, shown on every later line
        # Without a terminal (CI, pipes) print a line every ~10% instead of redrawing a bar.
        self._line_every = max(1, total_steps // 10)

    def __enter__(self):
        self._bar.__enter__()
        return self

    def __exit__(self, *exc):
        return self._bar.__exit__(*exc)

    def update(self, step: int, loss: float, lr: float, tokens_per_second: float) -> None:
        self._bar.update(self._task, completed=step, loss=f"{loss:.4f}", lr=f"{lr:.2e}", rate=f"{tokens_per_second:,.0f}",
                         evals=self._evals)
        if self.enabled and not self.console.is_terminal and (step % self._line_every == 0 or step == self.total):
            self.console.print(f"step {step}/{self.total}  loss {loss:.4f}  lr {lr:.2e}  {tokens_per_second:,.0f} tok/s"
                               + self._evals.replace(" | ", "  "))

    def show_exact_match(self, fraction: float) -> None:
        """Keep the latest eval exact match (training.eval_generate) on the progress line."""
        self._evals = f" | eval exact match {fraction:.1%}"

    def note(self, message: str) -> None:
        if self.enabled:
            self.console.print(message)
