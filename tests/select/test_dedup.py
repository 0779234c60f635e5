"""Dedup: exact and near-duplicates found, distinct texts kept apart; MinHash/LSH checked against
the exact Jaccard similarity of the shingle sets."""

from __future__ import annotations

import itertools
import random

from select_helpers import context_with, qa_pool

from tuneforge.select import plan_selection, run_selection
from tuneforge.select.algorithms.minhash import jaccard, near_duplicate_clusters, shingles

BASE = "The quick brown fox jumps over the lazy dog while the farmer sleeps in the warm afternoon sun"


def test_exact_duplicate_after_normalisation_is_found():
    texts = [BASE, "  the QUICK brown fox, jumps over the lazy dog -- while the farmer sleeps in the warm afternoon sun!",
             "A completely different sentence about tax forms and spreadsheets."]
    assert near_duplicate_clusters(texts) == [[0, 1]]


def test_near_duplicate_with_one_word_changed_is_found_and_unrelated_texts_are_not():
    near = BASE.replace("lazy", "sleepy")
    texts = ["Quarterly revenue rose by nine percent, driven by strong demand in Asia.", BASE,
             "Photosynthesis turns light, water and carbon dioxide into sugar and oxygen.", near]
    assert jaccard(shingles(BASE), shingles(near)) > 0.8  # the premise of the test
    assert near_duplicate_clusters(texts, threshold=0.8) == [[1, 3]]


def test_lsh_agrees_with_exact_jaccard_on_clear_cases():
    rng = random.Random(0)
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma".split()
    originals = [" ".join(rng.choice(words) for _ in range(30)) for _ in range(12)]
    edited = [text.replace(text.split()[5], "zzz", 1) for text in originals[:6]]  # one word changed
    texts = originals + edited
    clusters = near_duplicate_clusters(texts, threshold=0.7)
    together = {frozenset(pair) for cluster in clusters for pair in itertools.combinations(cluster, 2)}
    sets = [shingles(t) for t in texts]
    for i, j in itertools.combinations(range(len(texts)), 2):
        similarity = jaccard(sets[i], sets[j])
        if similarity >= 0.85:
            assert frozenset((i, j)) in together, f"missed a pair with Jaccard {similarity:.2f}"
        if similarity <= 0.4:
            assert frozenset((i, j)) not in together, f"merged a pair with Jaccard {similarity:.2f}"


def test_dedup_strategy_keeps_the_first_of_each_cluster_and_says_why():
    pool = qa_pool([("What is 2 + 2?", "4"), ("Name a colour.", "Blue"), ("what is 2+2 ?", "4"),
                    ("Name a colour!", "blue"), ("Who wrote Hamlet?", "Shakespeare")])
    result = run_selection(pool, plan_selection(pool, "dedup"), context_with())
    assert result.selection.kept == [0, 1, 4]
    assert result.selection.reasons[2] == "dropped: duplicate of example 1 (cluster 1, 2 members)"
    assert result.selection.reasons[3].startswith("dropped: duplicate of example 2")
    assert result.selection.details["dedup"]["clusters"] == [[0, 2], [1, 3]]


def test_pipeline_dedups_before_ranking_by_length():
    pool = qa_pool([("q1", "a long, long reply with many words"), ("q1", "A long long reply, with many words!"),
                    ("q2", "short"), ("q3", "a medium reply")])
    result = run_selection(pool, plan_selection(pool, "dedup+length", 2), context_with())
    assert result.selection.kept == [0, 3]  # length alone would keep the duplicate pair 0 and 1
    assert result.selection.reasons[1].startswith("dedup: dropped: duplicate of example 1")
    assert result.selection.reasons[2].startswith("length: dropped")
    assert [t.strategy for t in result.timings] == ["dedup", "length"]
