"""Continual-learning metrics over the accuracy matrix R.

R[i][j] is the accuracy on task j's test set after training on tasks 0..i (T rows, T columns);
``baseline[j]`` is the accuracy on task j of the model before any training. With T tasks:

- average accuracy (Lopez-Paz & Ranzato 2017, "Gradient Episodic Memory for Continual Learning", arXiv:1706.08840, the evaluation metrics):
      ACC = (1/T) Σ_i R[T-1][i]
- backward transfer (ibid.): how training later tasks changed earlier ones (negative = forgetting)
      BWT = 1/(T-1) Σ_{i<T-1} (R[T-1][i] - R[i][i])
- forward transfer (ibid.): how earlier tasks helped a task before it was trained
      FWT = 1/(T-1) Σ_{i>=1} (R[i-1][i] - baseline[i])
- average forgetting (Chaudhry et al. 2018, "Riemannian Walk for Incremental Learning", arXiv:1801.10112, the forgetting measure): the drop from each earlier
  task's best accuracy to its final accuracy
      f_j = max_{l<T-1} R[l][j] - R[T-1][j],   F = 1/(T-1) Σ_{j<T-1} f_j
"""

from __future__ import annotations

from collections.abc import Sequence

Matrix = Sequence[Sequence[float]]


def _check_square(matrix: Matrix) -> int:
    size = len(matrix)
    if size < 2 or any(len(row) != size for row in matrix):
        raise ValueError(f"R must be a square matrix of at least 2 tasks, got rows of lengths {[len(r) for r in matrix]}")
    return size


def average_accuracy(matrix: Matrix) -> float:
    size = _check_square(matrix)
    return sum(matrix[-1]) / size


def backward_transfer(matrix: Matrix) -> float:
    size = _check_square(matrix)
    return sum(matrix[-1][i] - matrix[i][i] for i in range(size - 1)) / (size - 1)


def forward_transfer(matrix: Matrix, baseline: Sequence[float]) -> float:
    size = _check_square(matrix)
    if len(baseline) != size:
        raise ValueError(f"baseline has {len(baseline)} entries for {size} tasks")
    return sum(matrix[i - 1][i] - baseline[i] for i in range(1, size)) / (size - 1)


def average_forgetting(matrix: Matrix) -> float:
    size = _check_square(matrix)
    drops = [max(matrix[row][task] for row in range(size - 1)) - matrix[-1][task] for task in range(size - 1)]
    return sum(drops) / (size - 1)


def summarize(matrix: Matrix, baseline: Sequence[float]) -> dict[str, float]:
    return {"average_accuracy": average_accuracy(matrix), "backward_transfer": backward_transfer(matrix),
            "forgetting": average_forgetting(matrix), "forward_transfer": forward_transfer(matrix, baseline)}
