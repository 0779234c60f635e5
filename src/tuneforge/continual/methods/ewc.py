"""``ewc``: elastic weight consolidation on the adapter's parameters.

    method: {name: ewc, strength: 1000, fisher_examples: 32}

Kirkpatrick et al. 2017, "Overcoming catastrophic forgetting in neural networks", Eq. 3: while
training task B, the loss is

    L(θ) = L_B(θ) + Σ_i (λ/2) F_i (θ_i - θ*_A,i)²

with θ*_A the parameters after task A and F the diagonal of the Fisher information at θ*_A. With
several earlier tasks each keeps its own anchor and Fisher and the penalties add (Kirkpatrick et al.'s
recipe for more than two tasks). F is the empirical Fisher: the mean over ``fisher_examples`` training
examples of the squared gradient of each example's mean token log-likelihood. Only the adapter trains (one adapter
carried from task to task), so θ, θ* and F are the adapter's parameters; the penalty reaches the
training loop through the ``extra_loss`` hook.
"""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from tuneforge.adapters import adapter_parameters
from tuneforge.adapters.hooks import TrainingHooks
from tuneforge.continual.methods.base import ADAPTER_NAME, ContinualMethod, Stage
from tuneforge.data import BatchPlan, tokenize_examples
from tuneforge.losses import token_loss_sum


class EwcOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    strength: float = Field(1000.0, ge=0, description="λ of Eq. 3")
    fisher_examples: int = Field(32, ge=1, description="training examples the diagonal Fisher is averaged over")


class EwcPenalty(TrainingHooks):
    """Σ_tasks Σ_i (λ/2) F_i (θ_i - θ*_i)² over the adapter's parameters."""

    def __init__(self, parameters: dict[str, nn.Parameter], consolidated: list[dict], strength: float):
        self.parameters, self.consolidated, self.strength = parameters, consolidated, strength

    def extra_loss(self, model: nn.Module) -> torch.Tensor | None:
        if not self.consolidated or self.strength == 0:
            return None
        total = None
        for task in self.consolidated:
            for name, param in self.parameters.items():
                fisher = task["fisher"][name].to(param.device)
                anchor = task["anchor"][name].to(param.device)
                term = (fisher * (param - anchor) ** 2).sum()
                total = term if total is None else total + term
        return 0.5 * self.strength * total


def diagonal_fisher(model: nn.Module, parameters: dict[str, nn.Parameter], examples, tokenizer, config) -> dict[str, torch.Tensor]:
    """Mean over examples of (∂ log p(y|x) / ∂θ)², one example per backward pass."""
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    tokenized = tokenize_examples(examples, tokenizer, template=config.data.template, max_seq_len=config.data.max_seq_len,
                                  train_on=config.data.train_on)
    plan = BatchPlan(tokenized, 1, packing=False, seed=0, pad_id=pad_id)
    sums = {name: torch.zeros_like(param, dtype=torch.float32) for name, param in parameters.items()}
    device = next(iter(parameters.values())).device
    was_training = model.training
    model.eval()  # no dropout: the Fisher of the model as it is used
    count = 0
    for batch in plan.batches(0):
        batch = {key: value.to(device) for key, value in batch.items()}
        model.zero_grad(set_to_none=True)
        loss_sum, tokens = token_loss_sum(model, batch, config.training.loss_chunk_size)
        (loss_sum / max(tokens, 1)).backward()
        for name, param in parameters.items():
            if param.grad is not None:
                sums[name] += param.grad.detach().float() ** 2
        count += 1
    model.zero_grad(set_to_none=True)
    model.train(was_training)
    return {name: (total / max(count, 1)).cpu() for name, total in sums.items()}


class Ewc(ContinualMethod):
    name = "ewc"
    options_class = EwcOptions

    def __init__(self, options, context):
        super().__init__(options, context)
        self.consolidated: list[dict] = []  # per earlier task: {"anchor": {...}, "fisher": {...}}

    def training_hooks(self, stage: Stage, model: nn.Module) -> list[TrainingHooks]:
        return [EwcPenalty(adapter_parameters(model, ADAPTER_NAME), self.consolidated, self.options.strength)]

    def after_task(self, stage: Stage, model: nn.Module, tokenizer) -> None:
        (task_index,) = stage.tasks
        parameters = adapter_parameters(model, ADAPTER_NAME)
        examples = self.context.tasks[task_index].train[: self.options.fisher_examples]
        fisher = diagonal_fisher(model, parameters, examples, tokenizer, self.context.train_config)
        anchor = {name: param.detach().float().cpu().clone() for name, param in parameters.items()}
        self.consolidated.append({"anchor": anchor, "fisher": fisher})

    def state_dict(self) -> dict:
        return {"consolidated": self.consolidated}

    def load_state_dict(self, state: dict) -> None:
        self.consolidated = list(state.get("consolidated", []))
