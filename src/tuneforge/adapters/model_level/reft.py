"""LoReFT and DiReFT (Wu et al. 2024, "ReFT: Representation Finetuning"): edits of the hidden states
that decoder layers output, at chosen layers and token positions; the weights stay untouched.

Paper: Wu et al., "ReFT: Representation Finetuning for Language Models", NeurIPS 2024, arXiv:2404.03592;
implements LoReFT, Φ(h) = h + Rᵀ(Wh + b − Rh), and its DiReFT ablation, both from its method section.

    LoReFT:  h + Rᵀ(W h + b − R h)      R (r × d) with orthonormal rows (torch's orthogonal parametrization)
    DiReFT:  h + W₂ᵀ(W₁ h + b)          no orthogonality: cheaper, the paper's ablation

``positions`` picks the edited tokens of each sequence: ``f3`` the first three, ``l3`` the last three,
``f3+l3`` both, ``all`` every token; padding (2D attention mask) is skipped and packed rows (4D mask with
restarting position ids) count per example. Interventions run when the backbone computes the
prompt (training, evaluation, the generation prefill); decoding steps with a KV cache are not edited,
as in the paper. Without a cache every generation step recomputes the whole sequence, so "last n"
then moves with it: use ``f`` positions (or the cache) when the two must agree.

Neither method is an identity at init (W, b and R start random, as in the paper). There is no peft
equivalent; files use ``base_model.model.<decoder layer>.<leaf>`` keys with tuneforge's leaf names.
"""

from __future__ import annotations

import functools
import re
from typing import Literal

import torch
from pydantic import Field, field_validator
from torch import nn
from torch.nn.utils.parametrizations import orthogonal

from tuneforge.adapters.model_level import (
    BackboneInputs,
    Finisher,
    ModelAdapter,
    ModelLevelConfig,
    check_layer_indices,
    decoder_layers,
    new_length,
    past_length,
    text_config,
)

FILE_PREFIX = "base_model.model."
POSITIONS = re.compile(r"all|[fl]\d+(\+[fl]\d+)?")


class ReftConfig(ModelLevelConfig):
    """Shared fields of LoReFT and DiReFT."""

    layers: list[int] | Literal["all"] = Field("all", description="decoder layer indices whose outputs are edited")
    positions: str = Field("f1+l1", description="'fN' first N tokens, 'lN' last N, 'fN+lM', or 'all'")
    r: int = Field(4, gt=0, description="rank of the edited subspace")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout on the edit")

    @field_validator("positions")
    @classmethod
    def _known_positions(cls, value: str) -> str:
        if not POSITIONS.fullmatch(value):
            raise ValueError("positions must be 'all', 'fN', 'lN' or 'fN+lM' (e.g. 'f3+l3')")
        return value


class LoReftConfig(ReftConfig):
    method: Literal["loreft"] = "loreft"


class DiReftConfig(ReftConfig):
    method: Literal["direft"] = "direft"


class LoReftIntervention(nn.Module):
    def __init__(self, hidden: int, r: int, dropout: float):
        super().__init__()
        # weight R: (r, d) with orthonormal rows. The Cayley map keeps them orthonormal for any value of the
        # underlying parameter; torch's default for wide matrices (Householder) does not (a row can vanish).
        self.rotation = orthogonal(nn.Linear(hidden, r, bias=False), orthogonal_map="cayley")
        self.source = nn.Linear(hidden, r)
        self.dropout = nn.Dropout(dropout)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        h = hidden.to(self.source.weight.dtype)
        rotation = self.rotation.weight
        edit = (self.source(h) - h @ rotation.T) @ rotation
        return hidden + self.dropout(edit).to(hidden.dtype)

    def file_tensors(self) -> dict[str, torch.Tensor]:
        return {"rotation": self.rotation.weight, "source.weight": self.source.weight, "source.bias": self.source.bias}

    def load_file_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            self.rotation.weight = tensors["rotation"].to(self.source.weight)  # orthogonal's right inverse
            self.source.weight.copy_(tensors["source.weight"])
            self.source.bias.copy_(tensors["source.bias"])


class DiReftIntervention(nn.Module):
    def __init__(self, hidden: int, r: int, dropout: float):
        super().__init__()
        self.source = nn.Linear(hidden, r)
        self.project_back = nn.Linear(hidden, r, bias=False)  # W₂ (r, d), used as W₂ᵀ
        self.dropout = nn.Dropout(dropout)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        h = hidden.to(self.source.weight.dtype)
        edit = self.source(h) @ self.project_back.weight
        return hidden + self.dropout(edit).to(hidden.dtype)

    def file_tensors(self) -> dict[str, torch.Tensor]:
        return {"source.weight": self.source.weight, "source.bias": self.source.bias,
                "project_back.weight": self.project_back.weight}

    def load_file_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for key, target in self.file_tensors().items():
                target.copy_(tensors[key])


def edited_positions(spec: str, length: int, mask: torch.Tensor | None, position_ids: torch.Tensor | None,
                     batch: int, device: torch.device) -> torch.Tensor:
    """(batch, tokens) bool: which tokens ``spec`` edits, per example (rows, or packed examples)."""
    if mask is not None and mask.dim() == 2:
        real = mask.bool()
    else:
        real = torch.ones(batch, length, dtype=torch.bool, device=device)
    if spec == "all":
        return real
    packed = mask is not None and mask.dim() == 4 and position_ids is not None
    starts = (position_ids.expand(batch, -1) == 0) if packed else torch.zeros_like(real)
    starts[:, 0] = True
    ends = torch.zeros_like(starts)
    ends[:, :-1] = starts[:, 1:]
    ends[:, -1] = True
    counts = real.long().cumsum(dim=1)
    before = counts - real.long()  # real tokens earlier in the row
    after = counts[:, -1:] - counts  # real tokens later in the row
    rank = before - torch.where(starts, before, 0).cummax(dim=1).values  # real tokens earlier in the example
    after_end = torch.where(ends, after, 0).flip(1).cummax(dim=1).values.flip(1)
    remaining = after - after_end  # real tokens later in the example
    chosen = torch.zeros_like(real)
    for part in spec.split("+"):
        count = int(part[1:])
        chosen |= (rank < count) if part[0] == "f" else (remaining < count)
    return chosen & real


class ReftAdapter(ModelAdapter):
    def __init__(self, config: ReftConfig, hidden: int, layer_paths: list[str]):
        super().__init__()
        kind = LoReftIntervention if config.method == "loreft" else DiReftIntervention
        self.positions = config.positions
        self.layer_paths = layer_paths
        self.interventions = nn.ModuleList(kind(hidden, config.r, config.dropout) for _ in layer_paths)
        # Tokens to edit in the latest prompt computation; kept after the call because checkpointed
        # layers replay their hooks in backward. None during decoding steps.
        self._where: torch.Tensor | None = None

    def before_backbone(self, backbone: nn.Module, inputs: BackboneInputs) -> Finisher | None:
        if past_length(inputs) > 0:
            self._where = None  # decoding step: the prompt was edited at the prefill
            return None
        reference = inputs.get("input_ids")
        reference = reference if reference is not None else inputs["inputs_embeds"]
        self._where = edited_positions(self.positions, new_length(inputs), inputs.get("attention_mask"),
                                       inputs.get("position_ids"), reference.shape[0], reference.device)
        return None

    def hook_layer(self, index: int, layer: nn.Module) -> None:
        # A partial of a bound method, not a closure: copy.deepcopy of the model then rebinds it to the copy.
        self.hook(layer.register_forward_hook(functools.partial(self._edit_hidden_states, index)))

    def _edit_hidden_states(self, index: int, module: nn.Module, args: tuple, output):
        hidden = output[0] if isinstance(output, tuple) else output
        if not self.live or self._where is None or self._where.shape != hidden.shape[:2]:
            return output
        edited = torch.where(self._where.unsqueeze(-1), self.interventions[index](hidden), hidden)
        return (edited, *output[1:]) if isinstance(output, tuple) else edited

    def file_tensors(self) -> dict[str, torch.Tensor]:
        pairs = zip(self.layer_paths, self.interventions)
        return {f"{FILE_PREFIX}{path}.{leaf}": tensor for path, intervention in pairs
                for leaf, tensor in intervention.file_tensors().items()}

    def load_file_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        for path, intervention in zip(self.layer_paths, self.interventions):
            prefix = f"{FILE_PREFIX}{path}."
            intervention.load_file_tensors({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})


def attach_reft(model: nn.Module, config: ReftConfig, adapter_name: str) -> ReftAdapter:
    layers = decoder_layers(model)
    indices = list(range(len(layers))) if config.layers == "all" else sorted(set(config.layers))
    check_layer_indices(indices, len(layers), "layers")
    chosen = [layers[i] for i in indices]
    adapter = ReftAdapter(config, text_config(model).hidden_size, [path for path, _ in chosen])
    for index, (_, layer) in enumerate(chosen):
        adapter.hook_layer(index, layer)
    return adapter
