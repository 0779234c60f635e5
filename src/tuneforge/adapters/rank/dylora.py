"""DyLoRA (Valipour et al. 2023, "DyLoRA: Parameter Efficient Tuning of Pre-trained Models using Dynamic
Search-Free Low-Rank Adaptation"): one adapter trained for every rank b in [min_r, r] at once.

Paper: Valipour et al., EACL 2023, arXiv:2210.07558; implements the truncated update of its method section
(written out below), in the frozen-lower-ranks form the paper trains by default.

Each training forward samples b uniformly from [min_r, r] and uses the truncated update::

    h = W x + (alpha / b) · B[:, :b] A[:b, :] x

As in the paper's main (frozen) variant, only the b-th row of A and column of B receive gradients; the
first b-1 components are detached, so each component is trained as the increment on top of the lower
ranks ("nested dropout"-like ordering of the representation). ``train_lower_ranks=true`` trains all
first b components instead (the paper's non-frozen ablation). In eval mode the layer uses ``eval_rank``
(default r); ``set_dylora_rank(model, b)`` picks the deployed rank without retraining.

Sampling is seeded and stateless: the n-th training forward of a layer draws b from ``(seed, n)``, and
since each layer runs once per model forward, all layers use the same b in the same forward; the draw
count is checkpointed by the hooks, so a resumed run samples what an uninterrupted one would.
(Gradient checkpointing re-runs forwards and would desynchronise the layers.) PEFT has no DyLoRA;
files use LoRA's leaf names.
"""

from __future__ import annotations

import math
import random
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from tuneforge.adapters.config import AdapterConfig
from tuneforge.adapters.hooks import TrainingHooks
from tuneforge.adapters.layer import LayerAdapter
from tuneforge.adapters.lora.lora import check_rank, is_transposed, refuse_quantized_merge, weight_shape
from tuneforge.errors import AdapterError


class DyLoraConfig(AdapterConfig):
    method: Literal["dylora"] = "dylora"
    r: int = Field(8, gt=0, description="largest rank trained (and the default eval rank)")
    min_r: int = Field(1, gt=0, description="smallest rank sampled during training")
    alpha: float = Field(16.0, gt=0, description="the update is scaled by alpha / b at rank b")
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    eval_rank: int | None = Field(None, gt=0, description="rank used outside training; default r")
    train_lower_ranks: bool = False
    seed: int = 0
    fan_in_fan_out: bool = False  # PEFT's flag for GPT-2's Conv1D; the layout is detected from the layer

    @model_validator(mode="after")
    def _ranks_in_order(self) -> "DyLoraConfig":
        if self.min_r > self.r:
            raise ValueError(f"min_r={self.min_r} is larger than r={self.r}; ranks are sampled from [min_r, r]")
        if self.eval_rank is not None and self.eval_rank > self.r:
            raise ValueError(f"eval_rank={self.eval_rank} is larger than r={self.r}; pick a rank in [1, {self.r}]")
        return self


def sample_rank(seed: int, draw: int, min_r: int, max_r: int) -> int:
    """The rank of training forward number ``draw``: uniform on [min_r, max_r], a pure function of its inputs."""
    return random.Random(f"dylora:{seed}:{draw}").randint(min_r, max_r)


class DyLoraLinear(LayerAdapter):
    def __init__(self, in_features: int, out_features: int, config: DyLoraConfig, transposed: bool):
        super().__init__()
        self.r = config.r
        self.min_r = config.min_r
        self.alpha = config.alpha
        self.eval_rank = config.eval_rank or config.r
        self.train_lower_ranks = config.train_lower_ranks
        self.transposed = transposed
        self.seed = config.seed
        self.draws = 0  # training forwards so far
        self.last_sampled_rank: int | None = None
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.lora_A = nn.Parameter(torch.empty(config.r, in_features))  # (r, in)
        self.lora_B = nn.Parameter(torch.zeros(out_features, config.r))  # (out, r)
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def truncated(self, b: int, *, detach_lower: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """(A[:b], B[:, :b]); with ``detach_lower`` only the b-th component carries gradients."""
        a, b_mat = self.lora_A[:b], self.lora_B[:, :b]
        if detach_lower and b > 1:
            a = torch.cat([a[:-1].detach(), a[-1:]], dim=0)
            b_mat = torch.cat([b_mat[:, :-1].detach(), b_mat[:, -1:]], dim=1)
        return a, b_mat

    def transform_output(self, x, out, base_layer):
        if self.training:
            b = sample_rank(self.seed, self.draws, self.min_r, self.r)
            self.draws += 1
            self.last_sampled_rank = b
            a, b_mat = self.truncated(b, detach_lower=not self.train_lower_ranks)
        else:
            b = self.eval_rank
            a, b_mat = self.truncated(b, detach_lower=False)
        x = self.dropout(x).to(a.dtype)
        return out + (F.linear(F.linear(x, a), b_mat) * (self.alpha / b)).to(out.dtype)

    def delta_weight(self, base_layer) -> torch.Tensor:
        b = self.eval_rank
        delta = self.lora_B[:, :b] @ self.lora_A[:b] * (self.alpha / b)  # (out, in)
        return delta.T if self.transposed else delta

    def merge(self, base_layer, safe):
        refuse_quantized_merge(base_layer)
        super().merge(base_layer, safe)

    def file_tensors(self):
        return {"lora_A.weight": self.lora_A, "lora_B.weight": self.lora_B}

    def parameter_roles(self):
        return {"lora_A": [self.lora_A], "lora_B": [self.lora_B]}


def build_dylora(base_layer: nn.Module, config: DyLoraConfig, module_name: str) -> LayerAdapter:
    in_features, out_features = weight_shape(base_layer)
    check_rank(config.r, in_features, out_features, module_name)
    return DyLoraLinear(in_features, out_features, config, is_transposed(base_layer))


def set_dylora_rank(model: nn.Module, rank: int, adapter_name: str | None = None) -> int:
    """Use rank ``rank`` outside training in every DyLoRA layer (of ``adapter_name``, or of all DyLoRA
    adapters); returns the number of layers changed. Merged adapters must be unmerged first. The
    adapter's config follows, so a saved adapter keeps the chosen rank."""
    from tuneforge.adapters.model import adapter_book, wrapped_layers

    changed, names = [], set()
    for layer_name, layer in wrapped_layers(model):
        for name, adapter in layer.adapters.items():
            if not isinstance(adapter, DyLoraLinear) or (adapter_name is not None and name != adapter_name):
                continue
            if not 1 <= rank <= adapter.r:
                raise AdapterError(f"DyLoRA rank {rank} for '{layer_name}' is outside [1, {adapter.r}] (the trained r)")
            if name in layer.merged:
                raise AdapterError(f"DyLoRA adapter '{name}' is merged into '{layer_name}'; "
                                   "unmerge_adapters(model) before changing its rank")
            changed.append(adapter)
            names.add(name)
    if not changed:
        raise AdapterError(f"no DyLoRA adapter{f' named {adapter_name!r}' if adapter_name else ''} in this model")
    for adapter in changed:
        adapter.eval_rank = rank
    for name in names:
        adapter_book(model).configs[name].eval_rank = rank
    return len(changed)


class DyLoraDrawCounter(TrainingHooks):
    """Checkpoints how many ranks each layer has drawn, so a resumed run continues the same sequence."""

    def __init__(self, model: nn.Module, adapter_name: str, config: DyLoraConfig):
        self.model = model
        self.adapter_name = adapter_name

    def layers(self) -> list[DyLoraLinear]:
        from tuneforge.adapters.model import wrapped_layers

        return [layer.adapters[self.adapter_name] for _, layer in wrapped_layers(self.model)
                if self.adapter_name in layer.adapters]

    def state_dict(self):
        return {"draws": [adapter.draws for adapter in self.layers()]}

    def load_state_dict(self, state):
        for adapter, draws in zip(self.layers(), state.get("draws", [])):
            adapter.draws = draws


def dylora_hooks(model: nn.Module, adapter_name: str, config: DyLoraConfig) -> DyLoraDrawCounter:
    return DyLoraDrawCounter(model, adapter_name, config)
