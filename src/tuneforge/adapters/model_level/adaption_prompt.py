"""Adaption prompts (LLaMA-Adapter, Zhang et al. 2023): learned prompts attended to in the top layers.

Paper: Zhang et al., "LLaMA-Adapter: Efficient Fine-tuning of Language Models with Zero-init Attention",
arXiv:2303.16199 (ICLR 2024); implements its sections "Learnable Adaption Prompts" (prompts in the top
layers) and "Zero-initialized Attention" (the prompts' softmax scores scaled by a gate g_l that starts at
zero), in PEFT's layout.

In each of the top ``adapter_layers`` attention layers, ``adapter_len`` learned prompt vectors are
projected by the layer's own k_proj/v_proj (no rotary embedding: they have no position); the layer's
rotary-embedded queries attend to them with their own softmax, scaled by a zero-initialised gate,
and the result goes through o_proj and is added to the attention output:

    out = attention(x) + o_proj(gate · softmax(q kᵀ / √d) v)

The zero gate makes the adapter an exact identity at init. The attention's own path is untouched, so
the KV cache and masks need no change (prompt positions are attended by every query). Llama-style
attention only (q/k/v/o projections, rotary ``position_embeddings``), as in the paper and in peft.
Files use peft's keys: ``base_model.model.<attention path>.adaption_prompt`` (1 × len × hidden) and
``.adaption_gate`` (1).
"""

from __future__ import annotations

import functools
import math
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from tuneforge.adapters.model_level import (
    ModelAdapter,
    ModelLevelConfig,
    attention_shape,
    decoder_layers,
    text_config,
)
from tuneforge.errors import AdapterError

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
FILE_PREFIX = "base_model.model."


class AdaptionPromptConfig(ModelLevelConfig):
    method: Literal["adaption-prompt"] = "adaption-prompt"
    adapter_len: int = Field(10, gt=0, description="prompt vectors per adapted layer")
    adapter_layers: int = Field(1, gt=0, description="how many of the top attention layers get a prompt")

    peft_type: ClassVar[str] = "ADAPTION_PROMPT"

    def to_peft_dict(self) -> dict[str, Any]:
        data = super().to_peft_dict()
        data["target_modules"] = "self_attn"  # peft's name for the Llama attention module it wraps
        return data


class LayerPrompt(nn.Module):
    """One attention layer's prompt and gate, under peft's parameter names."""

    def __init__(self, adapter_len: int, hidden_size: int):
        super().__init__()
        self.adaption_prompt = nn.Parameter(torch.randn(1, adapter_len, hidden_size))
        self.adaption_gate = nn.Parameter(torch.zeros(1))

    def attend(self, attention: nn.Module, hidden: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor],
               heads: int, kv_heads: int, head_dim: int) -> torch.Tensor:
        """o_proj(gate · softmax(q kᵀ/√d) v) for the layer input ``hidden`` (batch, tokens, hidden)."""
        batch, tokens, _ = hidden.shape
        query = attention.q_proj(hidden).view(batch, tokens, heads, head_dim).transpose(1, 2)
        cos, sin = (r.unsqueeze(1) for r in rotary)
        query = query * cos + _rotate_half(query) * sin
        prompt = self.adaption_prompt.to(hidden.dtype)
        length = prompt.shape[1]
        keys = attention.k_proj(prompt).view(1, length, kv_heads, head_dim).transpose(1, 2)
        values = attention.v_proj(prompt).view(1, length, kv_heads, head_dim).transpose(1, 2)
        keys = keys.repeat_interleave(heads // kv_heads, dim=1)  # grouped-query attention shares kv heads
        values = values.repeat_interleave(heads // kv_heads, dim=1)
        scores = query @ keys.transpose(2, 3) / math.sqrt(head_dim)  # (batch, heads, tokens, length)
        weights = self.adaption_gate.to(hidden.dtype) * F.softmax(scores, dim=-1, dtype=torch.float32).to(hidden.dtype)
        mixed = (weights @ values).transpose(1, 2).reshape(batch, tokens, heads * head_dim)
        return attention.o_proj(mixed)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat([-second, first], dim=-1)


class AdaptionPromptAdapter(ModelAdapter):
    def __init__(self, config: AdaptionPromptConfig, model_config: Any, attention_paths: list[str]):
        super().__init__()
        self.heads = model_config.num_attention_heads
        _, self.kv_heads, self.head_dim = attention_shape(model_config)
        self.attention_paths = attention_paths
        self.prompts = nn.ModuleList(LayerPrompt(config.adapter_len, model_config.hidden_size) for _ in attention_paths)

    def hook_attention(self, index: int, attention: nn.Module) -> None:
        # A partial of a bound method, not a closure: copy.deepcopy of the model then rebinds it to the copy.
        hook = functools.partial(self._add_prompt_attention, index)
        self.hook(attention.register_forward_hook(hook, with_kwargs=True))

    def _add_prompt_attention(self, index: int, module: nn.Module, args: tuple, kwargs: dict, output):
        if not self.live:
            return output
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        rotary = kwargs.get("position_embeddings")
        if rotary is None:
            raise AdapterError(f"adaption prompts need rotary position_embeddings in '{self.attention_paths[index]}' "
                               "(Llama-style attention)")
        extra = self.prompts[index].attend(module, hidden, rotary, self.heads, self.kv_heads, self.head_dim)
        if isinstance(output, tuple):
            return (output[0] + extra, *output[1:])
        return output + extra

    def file_tensors(self) -> dict[str, torch.Tensor]:
        tensors = {}
        for path, prompt in zip(self.attention_paths, self.prompts):
            tensors[f"{FILE_PREFIX}{path}.adaption_prompt"] = prompt.adaption_prompt
            tensors[f"{FILE_PREFIX}{path}.adaption_gate"] = prompt.adaption_gate
        return tensors


def attach_adaption_prompt(model: nn.Module, config: AdaptionPromptConfig, adapter_name: str) -> AdaptionPromptAdapter:
    layers = decoder_layers(model)
    if config.adapter_layers > len(layers):
        raise AdapterError(
            f"adapter_layers={config.adapter_layers} but {type(model).__name__} has {len(layers)} decoder layers; "
            f"use 1..{len(layers)}"
        )
    top = layers[len(layers) - config.adapter_layers:]
    attentions = [(f"{path}.self_attn", getattr(layer, "self_attn", None)) for path, layer in top]
    unsupported = [path for path, attention in attentions
                   if attention is None or not all(hasattr(attention, p) for p in PROJECTIONS)]
    if unsupported:
        raise AdapterError(
            f"adaption prompts need Llama-style attention (self_attn with {', '.join(PROJECTIONS)}); "
            f"{unsupported[0]} of {type(model).__name__} has none"
        )
    adapter = AdaptionPromptAdapter(config, text_config(model), [path for path, _ in attentions])
    for index, (_, attention) in enumerate(attentions):
        adapter.hook_attention(index, attention)
    return adapter
