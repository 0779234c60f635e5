"""The objective seam of the training loop: what turns a micro-batch into a loss.

The loop (train/loop.py) is the same for every objective; it asks the objective for

    units(batch)                 -> what the step's loss is averaged over (labelled tokens, pairs, ...)
    loss_sum(model, batch)       -> (loss summed over those units, metric sums for the log)
    evaluate(model, batches)     -> (eval loss, eval metrics)

| objective | data                                  | module     | reference model |
|-----------|---------------------------------------|------------|-----------------|
| sft       | any SFT format                        | losses.py  | -               |
| dpo       | {prompt, chosen, rejected}            | dpo.py     | yes             |
| ipo       | {prompt, chosen, rejected}            | ipo.py     | yes             |
| orpo      | {prompt, chosen, rejected}            | orpo.py    | -               |
| simpo     | {prompt, chosen, rejected}            | simpo.py   | -               |
| kto       | {prompt, completion, label}           | kto.py     | yes             |
| grpo      | prompts with a checkable answer       | grpo.py    | yes             |
"""

from tuneforge.train.objectives.base import OBJECTIVES, PAIRWISE, Objective, build_objective, needs_reference

__all__ = ["OBJECTIVES", "PAIRWISE", "Objective", "build_objective", "needs_reference"]
