"""Training-time hooks a method can ask for, without the training loop knowing any method.

Most methods are plain parameters trained by AdamW. A few need more from the loop:
- data-driven initialisations (CorDA, EVA, LoRA-GA) look at a few batches before training (``prepare``);
- regularisers (AdaLoRA's orthogonality, a mixture-of-experts load-balancing loss) add to the loss
  (``extra_loss``);
- rank allocation (AdaLoRA, SoRA, IncreLoRA) reads gradients before the optimizer step and edits the
  adapter after it (``before_optimizer_step`` / ``after_optimizer_step``).

A method opts in by giving its ``MethodSpec`` a ``hooks`` factory; ``training_hooks(model, name)``
collects them for one adapter. The training loop calls the five methods below and nothing else.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

Batch = dict[str, torch.Tensor]
LossFn = Callable[[nn.Module, Batch], torch.Tensor]


class TrainingHooks:
    """No-op defaults; a method overrides what it needs."""

    def prepare(self, model: nn.Module, batches: Iterable[Batch], loss_fn: LossFn) -> None:
        """Called once after the adapter is added and before the optimizer exists (also on resume,
        where the checkpoint's adapter weights are loaded afterwards, so a prepare that edits base
        weights must be deterministic)."""

    def extra_loss(self, model: nn.Module) -> torch.Tensor | None:
        """Added to each micro-batch's mean token loss."""
        return None

    def before_optimizer_step(self, model: nn.Module, step: int, total_steps: int) -> None:
        """Gradients of the accumulated step are available here (``step`` is 0-based)."""

    def after_optimizer_step(self, model: nn.Module, step: int, total_steps: int) -> None:
        """The adapter may change shape or masks here; the optimizer's state for it is kept."""

    def state_dict(self) -> dict:
        """Hook state saved in checkpoints (e.g. AdaLoRA's importance averages)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class HookChain(TrainingHooks):
    """Several hooks called in order (one per method in use)."""

    def __init__(self, hooks: list[TrainingHooks]):
        self.hooks = hooks

    def prepare(self, model, batches, loss_fn):
        batches = list(batches)
        for hook in self.hooks:
            hook.prepare(model, batches, loss_fn)

    def extra_loss(self, model):
        losses = [loss for hook in self.hooks if (loss := hook.extra_loss(model)) is not None]
        return sum(losses) if losses else None

    def before_optimizer_step(self, model, step, total_steps):
        for hook in self.hooks:
            hook.before_optimizer_step(model, step, total_steps)

    def after_optimizer_step(self, model, step, total_steps):
        for hook in self.hooks:
            hook.after_optimizer_step(model, step, total_steps)

    def state_dict(self):
        return {str(i): hook.state_dict() for i, hook in enumerate(self.hooks)}

    def load_state_dict(self, state):
        for i, hook in enumerate(self.hooks):
            hook.load_state_dict(state.get(str(i), {}))

    def needs_data(self) -> bool:
        return any(type(hook).prepare is not TrainingHooks.prepare for hook in self.hooks)


def training_hooks(model: nn.Module, name: str) -> HookChain:
    """The hooks adapter ``name``'s method asks for (an empty chain for plain methods)."""
    from tuneforge.adapters.model import adapter_book
    from tuneforge.adapters.registry import get_method

    config = adapter_book(model).configs[name]
    spec = get_method(config.method)
    hook = spec.hooks(model, name, config) if spec.hooks is not None else None
    return HookChain([hook] if hook is not None else [])
