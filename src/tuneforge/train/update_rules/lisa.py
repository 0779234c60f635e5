"""LISA: layerwise importance sampling (``update_rule.method: lisa``).

Paper: Pan et al., "LISA: Layerwise Importance Sampling for Memory-Efficient Large Language Model
Fine-Tuning", NeurIPS 2024, arXiv:2403.17919, Algorithm 1. The embeddings and the head always train
(the paper finds their weight norms change most under LoRA, §3.1); every K steps (``switch_every``)
all N_L middle (decoder) layers are frozen and γ of them (``active_layers``), drawn uniformly without
replacement, are unfrozen:

    for i in 0 .. T/K − 1:  freeze all layers except embedding and head;
                            unfreeze γ layers sampled from N_L (p = γ/N_L each);  run K AdamW steps

Optimizer state of a layer that leaves the sample is dropped, so Adam state exists for the
embeddings, the head and γ layers only. The sample of period i comes from a generator seeded by
(training.seed, i): a resumed run draws the same layers without saving them.
"""

from __future__ import annotations

import torch

from tuneforge.train.update_rules.base import UpdateRule
from tuneforge.train.update_rules.blocks import activate, params_by_layer


class LayerwiseSampling(UpdateRule):
    def __init__(self, model, config):
        training, rule = config.training, config.update_rule
        self.layers, self.always = params_by_layer(model)
        self.all_params = [p for params in self.layers.values() for p in params] + self.always
        super().__init__(torch.optim.AdamW(self.all_params, lr=training.lr, weight_decay=training.weight_decay))
        self.switch_every = rule.switch_every
        self.gamma = min(rule.active_layers, len(self.layers))
        self.seed = training.seed
        self.current: list[int] | None = None

    def layers_at(self, step: int) -> list[int]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + step // self.switch_every)
        indices = list(self.layers)
        return sorted(indices[i] for i in torch.randperm(len(indices), generator=generator)[: self.gamma].tolist())

    def begin_step(self, model, step: int) -> None:
        chosen = self.layers_at(step)
        if chosen != self.current:
            active = [p for index in chosen for p in self.layers[index]] + self.always
            activate(self.all_params, active, self.optimizer, forget=False)
            self.current = chosen

    def state_dict(self) -> dict:
        return {"switch_every": self.switch_every, "active_layers": self.gamma}

    def load_state_dict(self, state: dict) -> None:
        if state and (state.get("switch_every"), state.get("active_layers")) != (self.switch_every, self.gamma):
            from tuneforge.train.checkpoint import CheckpointError

            raise CheckpointError(f"the checkpoint was saved with update_rule.switch_every={state.get('switch_every')} "
                                  f"and active_layers={state.get('active_layers')}; resume with those settings")
