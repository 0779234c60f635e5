"""``modules_to_save``: whole trainable copies of chosen modules (e.g. the LM head), one per adapter.

The wrapper keeps the original module and one deep copy per adapter; the first active adapter
that has a copy decides which one runs. The copies are saved with the adapter under the module's
own key names (``base_model.model.lm_head.weight``), as PEFT does.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


class SavedModuleCopies(nn.Module):
    def __init__(self, original: nn.Module):
        super().__init__()
        self.original_module = original
        self.modules_to_save = nn.ModuleDict()
        self.active: list[str] = []
        self.disabled = False

    def add_copy(self, name: str) -> nn.Module:
        replica = copy.deepcopy(self.original_module)
        for param in replica.parameters():
            param.requires_grad_(True)
        self.modules_to_save[name] = replica
        return replica

    def current(self) -> nn.Module:
        if not self.disabled:
            for name in self.active:
                if name in self.modules_to_save:
                    return self.modules_to_save[name]
        return self.original_module

    @property
    def weight(self) -> torch.Tensor:
        """transformers reads ``get_output_embeddings().weight`` (e.g. for tying); give the live one."""
        return self.current().weight

    def forward(self, *args, **kwargs):
        return self.current()(*args, **kwargs)

    def file_tensors(self, name: str) -> dict[str, torch.Tensor]:
        return dict(self.modules_to_save[name].state_dict(keep_vars=True))

    def extra_repr(self) -> str:
        return f"active={self.active}"
