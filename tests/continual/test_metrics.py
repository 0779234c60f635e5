"""ACC, BWT, FWT (Lopez-Paz & Ranzato 2017) and average forgetting (Chaudhry et al. 2018),
checked against the definitions written out here element by element."""

from __future__ import annotations

import numpy as np
import pytest

from tuneforge.continual import metrics

R = [[0.50, 0.10, 0.00, 0.20],
     [0.30, 0.80, 0.05, 0.10],
     [0.40, 0.60, 0.90, 0.30],
     [0.20, 0.70, 0.50, 0.95]]
BASE = [0.05, 0.00, 0.10, 0.15]


def test_metrics_follow_the_papers_definitions():
    a = np.array(R)
    t = a.shape[0]
    acc = a[t - 1].mean()
    bwt = np.mean([a[t - 1, i] - a[i, i] for i in range(t - 1)])
    fwt = np.mean([a[i - 1, i] - BASE[i] for i in range(1, t)])
    forgetting = np.mean([a[: t - 1, j].max() - a[t - 1, j] for j in range(t - 1)])
    got = metrics.summarize(R, BASE)
    assert got["average_accuracy"] == pytest.approx(acc)
    assert got["backward_transfer"] == pytest.approx(bwt)
    assert got["forward_transfer"] == pytest.approx(fwt)
    assert got["forgetting"] == pytest.approx(forgetting)
    # The hand values: (0.2+0.7+0.5+0.95)/4; ((0.2-0.5)+(0.7-0.8)+(0.5-0.9))/3; ((0.1-0)+(0.05-0.1)+(0.3-0.15))/3;
    # ((0.5-0.2)+(0.8-0.7)+(0.9-0.5))/3 -- forgetting uses the best earlier accuracy, not the diagonal.
    assert (acc, bwt, fwt, forgetting) == pytest.approx((0.5875, -0.8 / 3, 0.2 / 3, 0.8 / 3))


def test_forgetting_takes_the_best_earlier_accuracy_not_the_diagonal():
    rows = [[0.2, 0.0], [0.6, 0.9]]  # task 0 improved after task 1: nothing forgotten, positive BWT
    assert metrics.average_forgetting(rows) == pytest.approx(0.2 - 0.6)
    assert metrics.backward_transfer(rows) == pytest.approx(0.4)


def test_a_matrix_that_is_not_square_is_refused():
    with pytest.raises(ValueError, match="square"):
        metrics.average_accuracy([[0.1, 0.2]])
