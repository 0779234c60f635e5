"""Prefix tuning (Li & Liang 2021): learned key/value prefixes of ``num_virtual_tokens`` in every layer.

Paper: Li & Liang, "Prefix-Tuning: Optimizing Continuous Prompts for Generation", ACL 2021,
arXiv:2101.00190; implements its method section: h_i = P_θ[i, :] at prefix positions of every layer, with
P_θ reparameterised by an MLP during training (``prefix_projection``).

The prefixes enter through the attention cache: before the backbone's first call for a sequence, a
transformers ``DynamicCache`` is filled with each layer's prefix keys and values (the one the caller
or ``generate`` passed, or a new one), the attention mask gets leading ones and given position ids
are shifted past the prefix, as the backbone itself does when it counts positions from the cache.
Later decoding steps find the prefix in the cache and only extend the mask and shift positions.

With ``prefix_projection`` the prefixes are reparameterised during training: a small embedding
passed through Linear-Tanh-Linear (``encoder_hidden_size``), as in the paper. Files hold only the
resulting plain prefixes (PEFT's ``prompt_embeddings``, num_virtual_tokens × layers·2·kv_heads·head_dim),
so a loaded adapter uses them directly; training checkpoints keep the projection too (``TrainingFormHooks``).
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import torch
from pydantic import Field
from torch import nn
from transformers import DynamicCache

from tuneforge.adapters.model_level import (
    BackboneInputs,
    Finisher,
    ModelAdapter,
    ModelLevelConfig,
    attention_shape,
    batch_size,
    check_position_budget,
    extend_attention_mask,
    new_length,
    past_length,
    shift_position_ids,
    text_config,
)
from tuneforge.errors import AdapterError
from tuneforge.models.cache_keyword import clear_output_cache, get_cache, set_cache


class PrefixTuningConfig(ModelLevelConfig):
    method: Literal["prefix-tuning"] = "prefix-tuning"
    num_virtual_tokens: int = Field(20, gt=0)
    prefix_projection: bool = False
    encoder_hidden_size: int | None = Field(None, gt=0, description="projection width; default kv_heads·head_dim")

    peft_type: ClassVar[str] = "PREFIX_TUNING"


class ProjectedPrefixes(nn.Module):
    """The reparameterisation used during training: embedding -> Linear -> Tanh -> Linear."""

    def __init__(self, count: int, kv_width: int, hidden: int, layers: int):
        super().__init__()
        self.embedding = nn.Parameter(torch.randn(count, kv_width))
        self.transform = nn.Sequential(nn.Linear(kv_width, hidden), nn.Tanh(), nn.Linear(hidden, layers * 2 * kv_width))

    def forward(self) -> torch.Tensor:
        return self.transform(self.embedding)


class PrefixTuningAdapter(ModelAdapter):
    def __init__(self, config: PrefixTuningConfig, model_config: Any):
        super().__init__()
        self.model_config = model_config
        self.num_virtual_tokens = config.num_virtual_tokens
        self.layers, self.kv_heads, self.head_dim = attention_shape(model_config)
        kv_width = self.kv_heads * self.head_dim
        width = self.layers * 2 * kv_width
        if config.prefix_projection:
            self.projection = ProjectedPrefixes(self.num_virtual_tokens, kv_width,
                                                config.encoder_hidden_size or kv_width, self.layers)
            self.prefixes = None
        else:
            self.projection = None
            self.prefixes = nn.Parameter(torch.randn(self.num_virtual_tokens, width))

    def table(self) -> torch.Tensor:
        """(num_virtual_tokens, layers · 2 · kv_heads · head_dim): per token, each layer's key then value."""
        return self.projection() if self.projection is not None else self.prefixes

    def layer_prefixes(self, batch: int, dtype: torch.dtype) -> list[tuple[torch.Tensor, torch.Tensor]]:
        per_layer = self.table().to(dtype).view(self.num_virtual_tokens, self.layers * 2, self.kv_heads, self.head_dim)
        per_layer = per_layer.permute(1, 2, 0, 3)  # (layers·2, kv_heads, tokens, head_dim)
        return [(per_layer[2 * i].expand(batch, -1, -1, -1), per_layer[2 * i + 1].expand(batch, -1, -1, -1))
                for i in range(self.layers)]

    def before_backbone(self, backbone: nn.Module, inputs: BackboneInputs) -> Finisher | None:
        count = self.num_virtual_tokens
        past = past_length(inputs)
        prefill = past == 0
        check_position_budget(self.model_config, count, new_length(inputs) + (0 if prefill else past - count))
        finish = None
        if prefill:
            _refuse_checkpointed_layers(backbone)
            cache = get_cache(inputs)
            if cache is None:
                cache = DynamicCache(config=backbone.config)
                if inputs.get("use_cache") is False:
                    finish = _forget_cache  # a caller without a cache must not get ours back (generate would reuse it)
            dtype = backbone.get_input_embeddings().weight.dtype
            for layer, (keys, values) in enumerate(self.layer_prefixes(batch_size(inputs), dtype)):
                cache.update(keys, values, layer)
            set_cache(inputs, backbone, cache)
        extend_attention_mask(inputs, count, virtual_queries=False)
        shift_position_ids(inputs, count, prepend=False)
        return finish

    def file_tensors(self) -> dict[str, torch.Tensor]:
        return {"prompt_embeddings": self.table()}

    def load_file_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        loaded = tensors["prompt_embeddings"].to(self.table().device, torch.float32)
        self.projection = None  # files hold the projected prefixes; the reparameterisation is not recoverable
        self.prefixes = nn.Parameter(loaded.clone())

    def training_form(self) -> nn.Module | None:
        return self.projection

    def restore_training_form(self, form: nn.Module) -> None:
        self.projection, self.prefixes = form, None

    def peft_fields(self) -> dict[str, Any]:
        return {"token_dim": self.kv_heads * self.head_dim, "num_layers": self.layers,
                "num_attention_heads": self.kv_heads, "num_transformer_submodules": 1,
                "encoder_hidden_size": self._encoder_hidden_size()}

    def _encoder_hidden_size(self) -> int:
        if self.projection is not None:
            return self.projection.transform[0].out_features
        return self.kv_heads * self.head_dim


def _refuse_checkpointed_layers(backbone: nn.Module) -> None:
    """transformers drops the cache inside checkpointed layers (a replay would append to it twice)."""
    if backbone.training and any(getattr(m, "gradient_checkpointing", False) for m in backbone.modules()):
        raise AdapterError(
            "prefix tuning cannot train with gradient checkpointing: transformers drops the attention cache that "
            "carries the prefixes inside checkpointed layers; set training.gradient_checkpointing=false"
        )


def _forget_cache(output: Any) -> Any:
    if isinstance(output, tuple):
        return output
    clear_output_cache(output)
    return output


def attach_prefix_tuning(model: nn.Module, config: PrefixTuningConfig, adapter_name: str) -> PrefixTuningAdapter:
    model_config = text_config(model)
    check_position_budget(model_config, config.num_virtual_tokens, 1)
    return PrefixTuningAdapter(config, model_config)
