"""Greedy maximisation of the facility-location function (Nemhauser, Wolsey & Fisher 1978):

    f(A) = sum_i max_{j in A} s_ij        (s_ij >= 0: how well j represents, or helps, i)

f is monotone submodular, so adding the element of largest marginal gain each time reaches at least
(1 - 1/e) of the best set of the same size. Gains only shrink as A grows, so a stale gain is an
upper bound: the lazy greedy (Minoux 1978) re-evaluates only the top of a heap.

The similarity is given by columns: for each candidate j, the rows i it covers and s_ij > 0, which
keeps a sparse k-nearest-neighbour similarity of 100k examples small.
"""

from __future__ import annotations

import heapq

import numpy as np

Column = tuple[np.ndarray, np.ndarray]  # (row indices, similarities), one per candidate


def dense_columns(similarity: np.ndarray) -> list[Column]:
    """Columns of a dense (n_rows, n_candidates) similarity matrix, zeros left out."""
    columns = []
    for j in range(similarity.shape[1]):
        rows = np.flatnonzero(similarity[:, j] > 0)
        columns.append((rows, similarity[rows, j].astype(np.float64)))
    return columns


def facility_location_value(columns: list[Column], n_rows: int, chosen: list[int]) -> float:
    best = np.zeros(n_rows)
    for j in chosen:
        rows, values = columns[j]
        np.maximum.at(best, rows, values)
    return float(best.sum())


def facility_location_greedy(columns: list[Column], n_rows: int, budget: int) -> tuple[list[int], list[float]]:
    """(chosen candidates in pick order, marginal gain of each). Once no candidate adds anything,
    the rest of the budget is filled in candidate order with gain 0."""
    best = np.zeros(n_rows)  # current max_{j in A} s_ij per row

    def gain(j: int) -> float:
        rows, values = columns[j]
        return float(np.maximum(values - best[rows], 0.0).sum())

    heap = [(-gain(j), j) for j in range(len(columns))]
    heapq.heapify(heap)
    chosen, gains = [], []
    while heap and len(chosen) < budget:
        stale, j = heapq.heappop(heap)
        fresh = gain(j)
        if heap and fresh < -heap[0][0] - 1e-12:  # someone else may now be better: re-queue with the true gain
            heapq.heappush(heap, (-fresh, j))
            continue
        chosen.append(j)
        gains.append(fresh)
        rows, values = columns[j]
        np.maximum.at(best, rows, values)
    return chosen, gains
