"""delift: pairwise in-context utility, then a facility-location pick (DELIFT-style).

Agarwal, Killamsetty, Popa & Danilevsky, "DELIFT: Data Efficient Language model Instruction
Fine-Tuning" (ICLR 2025, arXiv:2411.04425). Its utility of example j for example i is how much
showing j as an in-context example improves the model's prediction of i's reply: the distance
between i's ground truth and the model's output without j in context, minus that distance with j.
In our notation (checked against the paper's abstract and summaries, not symbol for symbol):

    U_ij = d(y_i, p(. | x_i)) - d(y_i, p(. | x_j, y_j, x_i))

and the subset maximises the facility-location function f(A) = sum_i max_{j in A} U_ij greedily.
Approximations here, to stay affordable: d is the reply's mean cross-entropy (nats/token) rather
than the paper's distance between probability vectors; U_ij is computed only for each i's
``neighbors`` nearest examples j in embedding space (every other pair counts as 0); negative
utilities count as 0; and an example covers itself with its own best utility, so a kept example's
row is fully served.
"""

from __future__ import annotations

import numpy as np

from tuneforge.data import Message
from tuneforge.select.algorithms.facility_location import facility_location_greedy
from tuneforge.select.pool import response_text
from tuneforge.select.registry import StrategySpec, register_strategy
from tuneforge.select.scoring.embeddings import EMBEDDERS, check_embedder_available, embed_pool
from tuneforge.select.selection import Selection
from tuneforge.select.strategies.checks import require_choice, require_instructions, require_positive_int

UTILITY_BLOCK = 2048  # examples whose in-context sequences are built and scored together


def nearest_neighbours(vectors: np.ndarray, count: int, block: int = 2048) -> np.ndarray:
    """(n, count) indices of each row's most similar other rows (cosine on unit vectors), in blocks."""
    count = min(count, len(vectors) - 1)
    result = np.zeros((len(vectors), max(count, 0)), dtype=np.int64)
    for start in range(0, len(vectors), block):
        similarity = vectors[start:start + block] @ vectors.T  # (b, n)
        similarity[np.arange(len(similarity)), np.arange(start, start + len(similarity))] = -np.inf
        result[start:start + block] = np.argsort(-similarity, axis=1, kind="stable")[:, :count]
    return result


def in_context_utilities(pool, neighbours: np.ndarray, scorer) -> np.ndarray:
    """(n, k) utilities U_ij = loss(y_i | x_i) - loss(y_i | x_j, y_j, x_i) for j = neighbours[i].

    The n x k in-context sequences are built and scored a block of examples at a time, so only one
    block's token ids are ever held."""
    conditioned, _ = scorer.example_sequences(pool.examples)
    alone = scorer.answer_scores(conditioned)[:, 0]
    helped = np.empty(neighbours.shape)
    for start in range(0, len(pool), UTILITY_BLOCK):
        block = []
        for i in range(start, min(start + UTILITY_BLOCK, len(pool))):
            example = pool.examples[i]
            for j in neighbours[i]:
                shown = pool.examples[j]
                prompt = [*shown.prompt_messages, Message("assistant", response_text(shown)), *example.prompt_messages]
                block.append(scorer.conditioned(prompt, response_text(example)))
        losses = scorer.answer_scores(block, kind="in-context")[:, 0]
        helped[start:start + UTILITY_BLOCK] = losses.reshape(-1, neighbours.shape[1])
    return alone[:, None] - helped


def utility_columns(neighbours: np.ndarray, utilities: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """Facility-location columns: candidate j covers every i it helps (U_ij > 0) and itself."""
    n = len(neighbours)
    gains = np.maximum(np.nan_to_num(utilities), 0.0)
    own = gains.max(axis=1) if gains.size else np.zeros(n)
    rows: list[list[int]] = [[j] for j in range(n)]
    values: list[list[float]] = [[float(own[j])] for j in range(n)]
    for i in range(n):
        for slot, j in enumerate(neighbours[i]):
            if gains[i, slot] > 0:
                rows[j].append(i)
                values[j].append(float(gains[i, slot]))
    return [(np.array(r), np.array(v)) for r, v in zip(rows, values)]


def select_by_utility(pool, budget: int, context) -> Selection:
    scorer = context.scorer()
    vectors = embed_pool(pool, context.option("embedder"), context)
    neighbours = nearest_neighbours(vectors, int(context.option("neighbors")))
    utilities = in_context_utilities(pool, neighbours, scorer)
    columns = utility_columns(neighbours, utilities)
    chosen, gains = facility_location_greedy(columns, len(pool), budget)
    position = {j: p for p, j in enumerate(chosen)}
    helpfulness = np.array([values.sum() - values[0] for _, values in columns])  # how much j helps the others
    reasons = [f"kept: pick {position[j] + 1} of {budget}, facility-location gain {gains[position[j]]:.4g}" if j in position
               else f"dropped: not picked (helps its neighbours by {helpfulness[j]:.4g} nats/token in total)"
               for j in range(len(pool))]
    return Selection(sorted(chosen), reasons, helpfulness, "total in-context utility for others (nats/token)")


def _check(pool, options) -> None:
    require_instructions(pool, "delift")
    require_positive_int(options, "neighbors", "delift")
    require_choice(options, "embedder", EMBEDDERS, "delift")
    check_embedder_available(options["embedder"], "strategy=delift")


register_strategy(StrategySpec(
    "delift", select_by_utility, "pairwise in-context utility among nearest neighbours + greedy facility location "
    "(DELIFT-style, arXiv:2411.04425)", uses_model=True, check=_check, options={"neighbors": 4, "embedder": "hidden"}))
