"""What the loop does when a step's loss or gradient norm is NaN or infinite.

One bad batch (a loss spike in fp16, a corrupt example) should cost one step, not the run: the
step is skipped (no optimizer update), counted, and logged. A run whose steps keep failing is
stopped with a message, and weights that already hold NaN/inf are never written over a good
checkpoint or the final adapter.

With ``precision: fp16`` a ``torch.amp.GradScaler`` scales the loss (Micikevicius et al. 2018,
"Mixed Precision Training", §3.2). An overflowing gradient while the scale is still above 1 is the
scaler's own search for a scale that fits fp16: that step is skipped and the scale halved, but it
does not count towards stopping the run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from tuneforge.errors import TuneforgeError


class TrainingStopped(TuneforgeError):
    """Training cannot go on (steps keep failing, or the weights are no longer finite)."""


@dataclass
class StepOutcome:
    """What one optimizer step measured; ``applied`` is False when the update was skipped."""

    loss: float
    grad_norm: float
    tokens: int
    applied: bool = True


class NonFiniteGuard:
    """Allows an optimizer step only when its loss and gradient norm are finite, and stops the run
    after ``max_in_a_row`` skipped steps in a row (``training.max_nonfinite_steps``)."""

    def __init__(self, max_in_a_row: int):
        self.max_in_a_row = max_in_a_row
        self.in_a_row = 0
        self.skipped = 0  # over the whole run (this process)

    def allows(self, loss: float, grad_norm: float, step: int, loss_scale: float | None = None) -> bool:
        if math.isfinite(loss) and math.isfinite(grad_norm):
            self.in_a_row = 0
            return True
        self.skipped += 1
        scaler_searching = loss_scale is not None and loss_scale > 1 and math.isfinite(loss)
        if not scaler_searching:
            self.in_a_row += 1
        if self.in_a_row >= self.max_in_a_row:
            raise TrainingStopped(
                f"stopped at step {step}: {self.in_a_row} optimizer steps in a row had a non-finite "
                f"{self.describe(loss, grad_norm)} (training.max_nonfinite_steps={self.max_in_a_row}). "
                "Lower training.lr, keep training.max_grad_norm set, or use precision=bf16/fp32; "
                "then continue from the last checkpoint with --resume (or start again with --overwrite)."
            )
        return False

    @staticmethod
    def describe(loss: float, grad_norm: float) -> str:
        parts = [f"loss ({loss})"] if not math.isfinite(loss) else []
        parts += [f"gradient norm ({grad_norm})"] if not math.isfinite(grad_norm) else []
        return " and ".join(parts) or "value"

    def note(self, outcome: StepOutcome, step: int) -> str:
        return (f"step {step}: skipped, non-finite {self.describe(outcome.loss, outcome.grad_norm)}; "
                f"{self.in_a_row} in a row, {self.skipped} in this run (stop at {self.max_in_a_row} in a row)")


def first_non_finite_parameter(model: nn.Module) -> str | None:
    """The name of the first trainable parameter holding NaN or inf, or None when all are finite."""
    for name, param in model.named_parameters():
        local = param.to_local() if hasattr(param, "to_local") else param  # FSDP: this rank's shard
        if param.requires_grad and not bool(torch.isfinite(local.detach()).all()):
            return name
    return None


def require_finite_adapter(model: nn.Module, step: int, what: str, last_good: str | None,
                           count_elsewhere=None) -> None:
    """Refuse to write ``what`` (a checkpoint, the final adapter) from weights holding NaN/inf.
    ``count_elsewhere`` sums a number over the processes (FSDP: each sees only its shards, and all
    must refuse together rather than leave the others waiting in the save)."""
    bad = first_non_finite_parameter(model)
    if count_elsewhere is not None and count_elsewhere(float(bad is not None)) > 0 and bad is None:
        bad = "a weight shard held by another process"
    if bad is None:
        return
    kept = f"the last good checkpoint, {last_good}, is kept" if last_good else "no checkpoint was written before"
    raise TrainingStopped(
        f"the adapter weights hold NaN or inf at step {step} (first: {bad}), so {what} was not written; {kept}. "
        "Lower training.lr or keep training.max_grad_norm set, then --resume from the last checkpoint."
    )
