"""grape: for each instruction, keep the candidate reply the target model finds most likely.

Zhang, Dai & Peng, "The Best Instruction-Tuning Data are Those That Fit" (GRAPE, arXiv:2502.04194):
among responses gathered from several sources, select the one with the highest length-normalised
probability under the model to be finetuned, (1/|A|) log p(A | Q) = -s(A|Q), i.e. the lowest mean
reply loss. Input records hold the prompt and a ``candidates`` list. GRAPE keeps one example per
instruction; a budget keeps the instructions whose chosen reply is most likely.
"""

from __future__ import annotations

import numpy as np

from tuneforge.data.records import chat_example
from tuneforge.errors import DataError
from tuneforge.select.registry import StrategySpec, register_strategy
from tuneforge.select.selection import Selection


def select_best_candidates(pool, budget: int | None, context) -> Selection:
    scorer = context.scorer()
    sequences, owners = [], []
    for index, example in enumerate(pool.examples):
        for candidate in pool.candidates[index]:
            sequences.append(scorer.conditioned(example.prompt_messages, candidate))
            owners.append(index)
    losses = scorer.answer_scores(sequences)[:, 0]
    owners_array = np.array(owners)
    examples, best_losses, reasons = [], np.empty(len(pool)), []
    for index, example in enumerate(pool.examples):
        mine = losses[owners_array == index]
        best = int(np.nanargmin(mine))
        best_losses[index] = mine[best]
        examples.append(chat_example([(m.role, m.content) for m in example.prompt_messages]
                                     + [("assistant", pool.candidates[index][best])], origin=example.origin))
        reasons.append(f"candidate {best + 1} of {len(mine)} chosen: mean reply loss {mine[best]:.4g} "
                       f"(others: {', '.join(f'{v:.4g}' for k, v in enumerate(mine) if k != best) or 'none'})")
    order = np.lexsort((np.arange(len(pool)), best_losses))
    kept = sorted(int(i) for i in order[: budget if budget is not None else len(pool)])
    chosen = set(kept)
    reasons = [("kept: " if i in chosen else f"dropped (budget {budget}): ") + reasons[i] for i in range(len(pool))]
    return Selection(kept, reasons, best_losses, "chosen reply loss (nats/token, lowest kept)", examples)


def _check(pool, options) -> None:
    if pool.candidates is None:
        raise DataError("strategy=grape needs several candidate replies per instruction (a 'candidates' list in each record), "
                        f"but {pool.source!r} has none. "
                        "Give records like {\"prompt\": \"...\", \"candidates\": [\"reply 1\", \"reply 2\"]} "
                        "(or \"instruction\" [+ \"input\"] instead of \"prompt\").")


register_strategy(StrategySpec(
    "grape", select_best_candidates, "per instruction, the candidate reply the target model finds most likely "
    "(GRAPE, arXiv:2502.04194); needs records with a 'candidates' list",
    uses_model=True, needs_budget=False, check=_check))
