"""BAdam: block-coordinate Adam over decoder layers (``update_rule.method: badam``).

Paper: Luo et al., "BAdam: A Memory Efficient Full Parameter Optimization Method for Large Language
Models", NeurIPS 2024, arXiv:2404.02827, Algorithm 1. The weights are split into D blocks (here: one
per decoder layer). A block-epoch visits the blocks in order π; block π_j trains for K Adam steps
(``switch_every``) with every other block fixed:

    θ_{π_j} ← K steps of Adam on L(θ_{π_1..π_{j-1}}^{new}, θ_{π_j}, θ_{π_{j+1}..π_D}^{old})

and its Adam moments are cleared when the block hands over, so optimizer state exists for one block
only. π is ascending, descending, a fresh random permutation every block-epoch (seeded by
training.seed and the block-epoch), or a fixed list (``blocks``). Trainable weights outside decoder
layers (embeddings, head) stay frozen, as in the authors' code.

The active block is a function of the step: ``block_at(step)``. A resumed run recomputes it and finds
the current block's moments in the optimizer state it loads; they are cleared at the same step
(step % K == 0) as in an uninterrupted run.
"""

from __future__ import annotations

import torch

from tuneforge.train.update_rules.base import UpdateRule
from tuneforge.train.update_rules.blocks import activate, params_by_layer


class BlockAdam(UpdateRule):
    def __init__(self, model, config):
        training, rule = config.training, config.update_rule
        self.layers, outside = params_by_layer(model)
        self.all_params = [p for params in self.layers.values() for p in params] + outside
        optimizer = torch.optim.AdamW(self.all_params, lr=training.lr, weight_decay=training.weight_decay)
        super().__init__(optimizer)
        self.switch_every = rule.switch_every
        self.order = rule.order
        self.fixed = [b for b in (rule.blocks or []) if b in self.layers]
        self.seed = training.seed
        for param in outside:
            param.requires_grad_(False)

    def block_order(self, round_index: int) -> list[int]:
        blocks = list(self.layers)
        if self.order == "descending":
            return blocks[::-1]
        if self.order == "fixed":
            return self.fixed
        if self.order == "random":
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + round_index)
            return [blocks[i] for i in torch.randperm(len(blocks), generator=generator).tolist()]
        return blocks

    def block_at(self, step: int) -> int:
        period = step // self.switch_every  # how many blocks have trained before this one
        order = self.block_order(period // len(self.block_order(0)))
        return order[period % len(order)]

    def begin_step(self, model, step: int) -> None:
        switching = step % self.switch_every == 0
        active = self.layers[self.block_at(step)]
        if switching or not active[0].requires_grad or any(p.requires_grad for p in self._others(active)):
            activate(self.all_params, active, self.optimizer, forget=switching)

    def _others(self, active):
        keep = {id(p) for p in active}
        return (p for p in self.all_params if id(p) not in keep)

    def state_dict(self) -> dict:
        return {"switch_every": self.switch_every, "order": self.order}

    def load_state_dict(self, state: dict) -> None:
        """The block is recomputed from the step; a checkpoint of another schedule cannot continue exactly."""
        if state and (state.get("switch_every"), state.get("order")) != (self.switch_every, self.order):
            from tuneforge.train.checkpoint import CheckpointError

            raise CheckpointError(f"the checkpoint was saved with update_rule.switch_every={state.get('switch_every')} "
                                  f"and order={state.get('order')}; resume with those settings")
