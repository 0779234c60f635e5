"""Trainable tokens: only chosen rows of the token embedding train (e.g. new special tokens).

No paper: this follows PEFT's ``TrainableTokens`` method, the reference implementation, whose file key it
uses. Equation: E'[t] = E_new[t] for t in ``token_indices``, E'[t] = E[t] otherwise.

The adapter holds new values for rows ``token_indices`` (initialised to the current rows, so a new
adapter changes nothing); a lookup of one of those tokens returns the trained row. When the output
head shares the embedding's weight (tied embeddings, e.g. GPT-2), the head is wrapped too and uses
the same trained rows for those tokens' logits, with no second copy. Only the rows are saved, under
PEFT's key ``<embedding>.trainable_tokens_delta`` (which, despite the name, holds the new values).
"""

from __future__ import annotations

import weakref
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field, field_validator, model_validator
from torch import nn

from tuneforge.adapters.config import AdapterConfig, TargetSpec
from tuneforge.adapters.layer import LayerAdapter
from tuneforge.errors import AdapterError

OUTPUT_HEAD = "lm_head"

# The embedding adapter most recently built on each embedding weight, so that a tied output head
# (built right after the embedding in the same add_adapter call: modules are visited in order) can
# share its rows. Keyed by id with a weak reference to check it is still the same tensor (tensors
# compare elementwise, so they cannot be dictionary keys themselves).
_ADAPTER_OF_WEIGHT: dict[int, tuple[weakref.ref, "TrainableTokensEmbedding"]] = {}


class TrainableTokensConfig(AdapterConfig):
    """token_indices: the vocabulary rows that train; target_modules: the input embedding's name.

    ``lm_head`` is added to list targets so a tied output head follows the trained rows; an untied
    head is left alone (its rows are not the embedding's).
    """

    method: Literal["trainable-tokens"] = "trainable-tokens"
    token_indices: list[int] = Field(min_length=1)
    target_modules: TargetSpec = ["embed_tokens", "wte"]
    init: Literal["copy", "random"] = "copy"

    peft_type: ClassVar[str] = "TRAINABLE_TOKENS"
    peft_field_names: ClassVar[dict[str, str]] = {"init": "init_weights"}

    @field_validator("token_indices")
    @classmethod
    def _indices_valid(cls, value: list[int]) -> list[int]:
        if any(i < 0 for i in value):
            raise ValueError(f"token indices must be >= 0, got {[i for i in value if i < 0]}")
        if len(set(value)) != len(value):
            raise ValueError("token indices must be unique")
        return value

    @model_validator(mode="after")
    def _follow_tied_head(self):
        if isinstance(self.target_modules, list) and OUTPUT_HEAD not in self.target_modules:
            self.target_modules = [*self.target_modules, OUTPUT_HEAD]
        return self

    def to_peft_dict(self) -> dict[str, Any]:
        data = super().to_peft_dict()
        data["init_weights"] = self.init == "copy"
        if isinstance(self.target_modules, list):  # peft finds a tied head on its own
            data["target_modules"] = [m for m in self.target_modules if m != OUTPUT_HEAD]
        return data

    @classmethod
    def normalize_peft_values(cls, data: dict[str, Any]) -> dict[str, Any]:
        if isinstance(data.get("init"), bool):
            data["init"] = "copy" if data["init"] else "random"
        return data


class TrainableTokensEmbedding(LayerAdapter):
    """New values for some embedding rows; looked-up tokens among them get the trained row."""

    def __init__(self, base_layer: nn.Embedding, token_indices: list[int], init: str):
        super().__init__()
        indices = torch.tensor(token_indices, dtype=torch.long)
        self.register_buffer("token_indices", indices, persistent=False)
        slots = torch.full((base_layer.num_embeddings,), -1, dtype=torch.long)
        slots[indices] = torch.arange(len(indices))
        self.register_buffer("slot_of_token", slots, persistent=False)  # (vocab,): row in the values, or -1
        rows = base_layer.weight.detach()[indices].clone().float()
        self.trainable_tokens_delta = nn.Parameter(rows if init == "copy" else torch.randn_like(rows))  # (k, dim)
        self.register_buffer("_merged_originals", None, persistent=False)

    def transform_output(self, x, out, base_layer):
        slots = self.slot_of_token[x]  # (...)
        rows = self.trainable_tokens_delta[slots.clamp(min=0)].to(out.dtype)  # (..., dim)
        scale = getattr(base_layer, "embed_scale", None)  # scaled embeddings (e.g. Gemma) scale in forward
        if scale is not None:
            rows = rows * scale.to(out.dtype)
        return torch.where((slots >= 0).unsqueeze(-1), rows, out)

    def delta_weight(self, base_layer):
        delta = torch.zeros_like(base_layer.weight)
        return delta.index_copy(0, self.token_indices, self.trainable_tokens_delta.to(delta.dtype)
                                - base_layer.weight[self.token_indices])

    def merge(self, base_layer, safe):
        if safe and not torch.isfinite(self.trainable_tokens_delta).all():
            raise AdapterError("safe merge refused: trainable token rows hold NaN/Inf; the base model is unchanged")
        weight = base_layer.weight
        with torch.no_grad():
            self._merged_originals = weight[self.token_indices].clone()
            weight.index_copy_(0, self.token_indices, self.trainable_tokens_delta.to(weight.dtype))

    def unmerge(self, base_layer):
        with torch.no_grad():
            base_layer.weight.index_copy_(0, self.token_indices, self._merged_originals)
        self._merged_originals = None

    def file_tensors(self):
        return {"trainable_tokens_delta": self.trainable_tokens_delta}


class TiedTokensHead(LayerAdapter):
    """An output head tied to the embedding: the trained rows give those tokens' logits.

    It owns no parameters (the embedding adapter does), so nothing is trained or saved twice; merging
    the embedding adapter already wrote the shared weight.
    """

    def __init__(self, embedding_adapter: TrainableTokensEmbedding):
        super().__init__()
        self._embedding_adapter = [embedding_adapter]  # a list: not a submodule, its rows are not ours

    def transform_output(self, x, out, base_layer):
        adapter = self._embedding_adapter[0]
        columns = x.to(adapter.trainable_tokens_delta.dtype) @ adapter.trainable_tokens_delta.T  # (..., k)
        if base_layer.bias is not None:
            columns = columns + base_layer.bias[adapter.token_indices]
        return out.index_copy(out.dim() - 1, adapter.token_indices, columns.to(out.dtype))

    def merge(self, base_layer, safe):
        pass

    def unmerge(self, base_layer):
        pass

    def file_tensors(self):
        return {}


class UntiedHead(LayerAdapter):
    """An output head with its own weight: trainable tokens leave it alone."""

    def transform_output(self, x, out, base_layer):
        return out

    def merge(self, base_layer, safe):
        pass

    def unmerge(self, base_layer):
        pass

    def file_tensors(self):
        return {}


def build_trainable_tokens(base_layer: nn.Module, config: TrainableTokensConfig, module_name: str) -> LayerAdapter:
    if isinstance(base_layer, nn.Embedding):
        return _build_embedding(base_layer, config, module_name)
    embedding_adapter = _embedding_adapter_of(base_layer.weight)
    if embedding_adapter is not None:
        return TiedTokensHead(embedding_adapter)
    if module_name.split(".")[-1] == OUTPUT_HEAD:
        return UntiedHead()
    raise AdapterError(
        f"trainable-tokens: '{module_name}' is a {type(base_layer).__name__}; target the input embedding "
        "(e.g. 'embed_tokens', GPT-2's 'wte'); a tied output head follows it on its own"
    )


def _embedding_adapter_of(weight: torch.Tensor) -> TrainableTokensEmbedding | None:
    weight_ref, adapter = _ADAPTER_OF_WEIGHT.get(id(weight), (None, None))
    return adapter if weight_ref is not None and weight_ref() is weight else None


def _build_embedding(base_layer: nn.Embedding, config: TrainableTokensConfig, module_name: str) -> LayerAdapter:
    vocab = base_layer.num_embeddings
    too_large = [i for i in config.token_indices if i >= vocab]
    if too_large:
        raise AdapterError(
            f"trainable-tokens: token_indices {too_large} are outside the vocabulary of '{module_name}' "
            f"({vocab} rows, indices 0..{vocab - 1}); resize the embeddings first "
            "(model.resize_token_embeddings) or fix the indices"
        )
    adapter = TrainableTokensEmbedding(base_layer, config.token_indices, config.init)
    _ADAPTER_OF_WEIGHT.clear()  # only the current add_adapter call's embedding matters
    _ADAPTER_OF_WEIGHT[id(base_layer.weight)] = (weakref.ref(base_layer.weight), adapter)
    return adapter
