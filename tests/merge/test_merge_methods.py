"""The pure merging functions: hand-computed answers, DARE statistics, and agreement with peft's merge_utils."""

from __future__ import annotations

import pytest
import torch
from peft.utils import merge_utils

from tuneforge.errors import ConfigError
from tuneforge.merge import methods

T1 = torch.tensor([1.0, -2.0, 3.0, 0.5])
T2 = torch.tensor([-2.0, 1.5, 1.0, 0.1])


def test_task_arithmetic_is_the_weighted_sum():
    out = methods.task_arithmetic([T1, T2], [0.5, -1.0])
    assert torch.allclose(out, torch.tensor([2.5, -2.5, 0.5, 0.15]))


def test_trim_keeps_the_largest_magnitudes():
    assert torch.equal(methods.trim_by_magnitude(T1, 0.5), torch.tensor([0.0, -2.0, 3.0, 0.0]))
    assert torch.equal(methods.trim_by_magnitude(T1, 1.0), T1)


def test_magnitude_prune_trims_then_sums():
    out = methods.magnitude_prune([T1, T2], [1.0, 2.0], density=0.5)
    # T1 -> [0, -2, 3, 0], T2 -> [-2, 1.5, 0, 0]
    assert torch.allclose(out, torch.tensor([-4.0, 1.0, 3.0, 0.0]))


@pytest.mark.parametrize("density,weights,sign_method,expected", [
    # No trimming; total mass elects [-, -, +, +]; each entry averages the agreeing tensors.
    (1.0, [1.0, 1.0], "total", [-2.0, -2.0, 2.0, 0.3]),
    # Frequency: one vote each way on entries 0 and 1, a tie goes to +.
    (1.0, [1.0, 1.0], "frequency", [1.0, 1.5, 2.0, 0.3]),
    # Trim to 2 of 4: T1 -> [0, -2, 3, 0], T2 -> [-2, 1.5, 0, 0]; entry 3 has no agreeing value.
    (0.5, [1.0, 1.0], "total", [-2.0, -2.0, 3.0, 0.0]),
    # Weights apply after the election, and the mean divides by the agreeing count, not the weights.
    (0.5, [0.5, 2.0], "total", [-4.0, -1.0, 1.5, 0.0]),
])
def test_ties_on_hand_made_tensors(density, weights, sign_method, expected):
    out = methods.ties([T1, T2], weights, density, sign_method)
    assert torch.allclose(out, torch.tensor(expected))


def test_dare_keeps_about_density_and_preserves_the_expected_value():
    ones = torch.ones(200_000)
    dropped = methods.random_drop(ones, 0.3, torch.Generator().manual_seed(0))
    kept = dropped != 0
    assert abs(kept.float().mean().item() - 0.3) < 0.01
    assert torch.allclose(dropped[kept], torch.full_like(dropped[kept], 1 / 0.3))
    assert abs(dropped.mean().item() - 1.0) < 0.03  # rescaling by 1/density keeps the sum in expectation


def test_dare_matches_a_naive_formula_with_the_same_masks():
    g = torch.Generator().manual_seed(5)
    tensors = [torch.randn(6, 5, generator=g) for _ in range(3)]
    weights, density = [0.6, -0.3, 1.2], 0.4
    out_linear = methods.dare(tensors, weights, density, generator=torch.Generator().manual_seed(7))
    out_ties = methods.dare(tensors, weights, density, majority_sign_method="total",
                            generator=torch.Generator().manual_seed(7))
    masks_from = torch.Generator().manual_seed(7)
    masks = [torch.bernoulli(torch.full((6, 5), density), generator=masks_from) for _ in tensors]
    dropped = [t * m / density for t, m in zip(tensors, masks)]
    assert torch.allclose(out_linear, sum(w * d for w, d in zip(weights, dropped)), atol=1e-6)
    expected = torch.zeros(6, 5)
    for i in range(6):  # entry by entry, as the paper states it
        for j in range(5):
            values = [d[i, j].item() for d in dropped]
            sign = 1.0 if sum(values) >= 0 else -1.0
            agree = [(w, v) for w, v in zip(weights, values) if v != 0 and (v > 0) == (sign > 0)]
            expected[i, j] = sum(w * v for w, v in agree) / max(len(agree), 1)
    assert torch.allclose(out_ties, expected, atol=1e-6)


def test_dare_with_density_one_is_plain_arithmetic():
    out = methods.dare([T1, T2], [1.0, 0.5], 1.0, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out, methods.task_arithmetic([T1, T2], [1.0, 0.5]))


@pytest.mark.parametrize("name", ["task_arithmetic", "magnitude_prune", "ties", "dare_linear", "dare_ties"])
def test_agrees_with_peft_merge_utils(name):
    g = torch.Generator().manual_seed(11)
    tensors = [torch.randn(16, 12, generator=g) for _ in range(3)]
    weights = [0.8, -0.5, 0.3]
    theirs_weights = torch.tensor(weights)
    seed = 123
    if name == "task_arithmetic":
        ours, theirs = methods.task_arithmetic(tensors, weights), merge_utils.task_arithmetic(tensors, theirs_weights)
    elif name == "magnitude_prune":
        ours = methods.magnitude_prune(tensors, weights, 0.4)
        theirs = merge_utils.magnitude_prune(tensors, theirs_weights, 0.4)
    elif name == "ties":
        ours = methods.ties(tensors, weights, 0.4, "frequency")
        theirs = merge_utils.ties(tensors, theirs_weights, 0.4, "frequency")
    else:
        sign = "total" if name == "dare_ties" else None
        generator = torch.Generator().manual_seed(seed)
        ours = methods.dare(tensors, weights, 0.4, majority_sign_method=sign, generator=generator)
        torch.manual_seed(seed)  # peft draws from the global generator: same stream, same masks
        theirs = (merge_utils.dare_ties(tensors, theirs_weights, 0.4, "total") if sign
                  else merge_utils.dare_linear(tensors, theirs_weights, 0.4))
    assert torch.allclose(ours, theirs, atol=1e-6)


@pytest.mark.parametrize("call,match", [
    (lambda: methods.ties([T1, T2], [1.0, 1.0], 0.0), r"density=0.0 is outside \(0, 1\]"),
    (lambda: methods.ties([T1, T2], [1.0, 1.0], 1.5), r"density=1.5 is outside"),
    (lambda: methods.magnitude_prune([T1, T2], [1.0, 1.0], None), r"needs density="),
    (lambda: methods.task_arithmetic([T1, T2], [1.0]), r"got 1 weights for 2 tensors"),
    (lambda: methods.ties([T1, T2], [1.0, 1.0], 0.5, "majority"), r"majority_sign_method='majority'"),
    (lambda: methods.task_arithmetic([T1, torch.ones(3)], [1.0, 1.0]), r"one shape"),
])
def test_bad_arguments_are_config_errors(call, match):
    with pytest.raises(ConfigError, match=match):
        call()
