"""Update rules: how one training step turns micro-batches into a weight change (``update_rule.method``).

The loop stays one loop. Each step it calls ``rule.begin_step`` (BAdam and LISA choose the weights
that train this step) and then either

- runs forward and backward itself and calls ``rule.optimizer.step()`` — plain AdamW, 8-bit AdamW,
  GaLore, APOLLO, BAdam and LISA are optimizers over the trainable weights — or,
- when ``rule.takes_whole_step``, hands the micro-batches and the loss function to
  ``rule.whole_step``: LOMO/AdaLomo apply each gradient inside backward (optimizer.step has nothing
  left to do), and MeZO takes no backward at all, only two forward passes.

Every rule keeps ``rule.optimizer`` (the scheduler sets its learning rate, the checkpoint saves its
state) and its own ``state_dict()`` for what the optimizer does not hold, so resuming is exact.
"""

from __future__ import annotations

from tuneforge.train.update_rules.base import UpdateRule, WholeStepOutcome, build_update_rule

__all__ = ["UpdateRule", "WholeStepOutcome", "build_update_rule"]
