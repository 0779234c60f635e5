"""el2n: score each example by the error of a model after a short warm-up run, keep the hardest.

Paul, Ganguli & Dziugaite, "Deep Learning on a Data Diet: Finding Important Examples Early in
Training" (NeurIPS 2021, arXiv:2107.07075), §2: EL2N(x, y) = E || p(w_t, x) - y ||_2, the L2 norm of
the error vector of the softmax output early in training (t small); high-EL2N examples are kept.
For a reply of several tokens we average the per-token norm over the reply (scoring/model.py);
``score=loss`` uses the reply's mean cross-entropy instead (loss-based pruning). The paper notes the
very hardest examples can be label noise: ``skip_hardest`` drops that fraction of the top first.

The warm-up is an ordinary tuneforge training run (LoRA, ``warmup_steps`` steps) on a copy of the
base model: the trainer is reused, not forked.
"""

from __future__ import annotations

import copy
import json
import tempfile
from pathlib import Path

import numpy as np

from tuneforge.errors import ConfigError
from tuneforge.select.pool import example_record
from tuneforge.select.registry import StrategySpec, register_strategy
from tuneforge.select.scoring.model import ScoringModel
from tuneforge.select.selection import keep_best
from tuneforge.select.strategies.checks import require_choice, require_positive_int

SCORES = ("el2n", "loss")


def warmed_up_scorer(pool, context) -> ScoringModel:
    """A copy of the base model with a LoRA adapter trained ``warmup_steps`` steps on the pool."""
    from tuneforge.config import parse_train_config
    from tuneforge.train import train

    scorer = context.scorer()
    model = copy.deepcopy(scorer.model)
    with tempfile.TemporaryDirectory(prefix="tuneforge-el2n-") as work:
        data_path = Path(work) / "pool.jsonl"
        data_path.write_text("".join(json.dumps(example_record(e)) + "\n" for e in pool.examples), encoding="utf-8")
        config = parse_train_config({
            "model": scorer.name, "device": str(scorer.device), "output_dir": str(Path(work) / "run"),
            "data": {"train": str(data_path), "template": scorer.template, "max_seq_len": scorer.max_seq_len,
                     "eval_size": 0},
            "training": {"max_steps": int(context.option("warmup_steps")), "lr": float(context.option("warmup_lr")),
                         "batch_size": int(context.option("warmup_batch_size")), "seed": context.seed,
                         "log_every": 1000},
        }, source="el2n warm-up")
        train(config, model_and_tokenizer=(model, scorer.tokenizer))
    return ScoringModel(model, scorer.tokenizer, scorer.name, scorer.template, scorer.batch_size,
                        scorer.max_seq_len, scorer.cache, use_cache=False)


def select_by_el2n(pool, budget: int, context):
    warmed = warmed_up_scorer(pool, context)
    conditioned, _ = warmed.example_sequences(pool.examples)
    column = 1 if context.option("score") == "el2n" else 0
    scores = warmed.answer_scores(conditioned)[:, column]
    skip = int(round(float(context.option("skip_hardest")) * len(pool)))
    hardest = np.argsort(-np.nan_to_num(scores, nan=-np.inf), kind="stable")[:skip]
    eligible = np.ones(len(pool), dtype=bool)
    eligible[hardest] = False
    label = "EL2N" if column == 1 else "warm-up reply loss"
    return keep_best(scores, budget, higher_is_better=True, label=label, eligible=eligible,
                     ineligible_reason=f"among the hardest {skip} (skip_hardest): likely noise")


def _check(pool, options) -> None:
    require_choice(options, "score", SCORES, "el2n")
    require_positive_int(options, "warmup_steps", "el2n")
    require_positive_int(options, "warmup_batch_size", "el2n")
    if not 0 <= float(options["skip_hardest"]) < 1:
        raise ConfigError(f"strategy=el2n: option skip_hardest={options['skip_hardest']!r} must be a fraction in [0, 1)")


register_strategy(StrategySpec(
    "el2n", select_by_el2n, "the hardest examples by EL2N (or loss) after a short LoRA warm-up run (Paul et al. 2021)",
    uses_model=True, check=_check,
    options={"warmup_steps": 20, "warmup_lr": 2e-4, "warmup_batch_size": 8, "score": "el2n", "skip_hardest": 0.0}))
