"""``olora``: O-LoRA, orthogonal subspace learning (Wang et al. 2023, "Orthogonal Subspace Learning for
Language Model Continual Learning", EMNLP Findings, arXiv:2310.14152).

    method: {name: olora, orthogonality: 0.5, l2: 0.0}

Each task trains a new LoRA; earlier tasks' LoRAs stay frozen and keep contributing (here folded
into the base weights, the same function as summing frozen adapters). The new LoRA's input
subspace is pushed to be orthogonal to each earlier one's: with A_i the down-projection of
task i (PEFT's ``lora_A``, shape (r, in); the paper writes its transpose), per layer

    O_{i,t} = A_i A_tᵀ,   L_orth(A_i, A_t) = Σ_{j,k} O_{i,t}[j,k]²

and the training loss is L = L_task + λ1 Σ_{i<t} L_orth(A_i, A_t) + λ2 ‖θ_t‖² (λ1 = ``orthogonality``,
λ2 = ``l2`` on the new LoRA's parameters), added through the loop's ``extra_loss`` hook.
"""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from tuneforge.adapters.hooks import TrainingHooks
from tuneforge.continual.methods.base import ADAPTER_NAME, ContinualMethod, Stage
from tuneforge.continual.methods.lora_layers import fold_in, lora_layers, require_lora


class OLoraOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    orthogonality: float = Field(0.5, ge=0, description="λ1: weight of the orthogonality loss")
    l2: float = Field(0.0, ge=0, description="λ2: L2 penalty on the new task's LoRA parameters")


def orthogonality_loss(earlier: torch.Tensor, current: torch.Tensor) -> torch.Tensor:
    """Σ_{j,k} (A_i A_tᵀ)[j,k]² for A_i (r_i, in) and A_t (r, in)."""
    return ((earlier.to(current) @ current.T) ** 2).sum()


class OrthogonalSubspaces(TrainingHooks):
    def __init__(self, model: nn.Module, earlier: list[dict[str, torch.Tensor]], orthogonality: float, l2: float):
        self.layers = lora_layers(model, ADAPTER_NAME)
        self.earlier, self.orthogonality, self.l2 = earlier, orthogonality, l2

    def extra_loss(self, model: nn.Module) -> torch.Tensor | None:
        terms = []
        for layer_name, lora in self.layers.items():
            if self.orthogonality:
                terms += [self.orthogonality * orthogonality_loss(task[layer_name], lora.lora_A)
                          for task in self.earlier if layer_name in task]
            if self.l2:
                terms.append(self.l2 * (lora.lora_A.pow(2).sum() + lora.lora_B.pow(2).sum()))
        return torch.stack(terms).sum() if terms else None


class OLora(ContinualMethod):
    name = "olora"
    options_class = OLoraOptions

    def __init__(self, options, context):
        require_lora(context.train_config, self.name)
        super().__init__(options, context)
        self.subspaces: list[dict[str, torch.Tensor]] = []  # per earlier task: layer -> A_i (r, in)

    def init_adapter(self, stage: Stage):
        return None  # a new LoRA per task

    def training_model(self, stage: Stage, base: nn.Module) -> nn.Module:
        return fold_in(base, [done.adapter_dir for done in self.finished])

    def training_hooks(self, stage: Stage, model: nn.Module) -> list[TrainingHooks]:
        return [OrthogonalSubspaces(model, self.subspaces, self.options.orthogonality, self.options.l2)]

    def after_task(self, stage: Stage, model: nn.Module, tokenizer) -> None:
        self.subspaces.append({name: lora.lora_A.detach().float().cpu().clone()
                               for name, lora in lora_layers(model, ADAPTER_NAME).items()})

    def state_dict(self) -> dict:
        return {"subspaces": self.subspaces}

    def load_state_dict(self, state: dict) -> None:
        self.subspaces = list(state.get("subspaces", []))
