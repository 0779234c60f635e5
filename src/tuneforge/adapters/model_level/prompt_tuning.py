"""Prompt tuning (Lester et al. 2021): ``num_virtual_tokens`` learned embeddings prepended to the input.

Paper: Lester, Al-Rfou & Constant, "The Power of Scale for Parameter-Efficient Prompt Tuning", EMNLP 2021,
arXiv:2104.08691, §2: the input becomes [P_e; X_e], P_e ∈ R^{p×e} the trainable prompt.

The soft prompt enters as ``inputs_embeds`` in front of the token embeddings, with the attention mask
and any given position ids extended; the backbone's hidden states for the virtual positions are then
dropped, so logits, labels and the chunked training loss stay aligned with the input ids exactly as
without an adapter (peft instead returns the virtual positions' logits and pads the labels with -100;
the only difference is that peft also scores the first input token from the last virtual one).

In generation the prompt is prepended once, at the prefill; later steps find it in the KV cache and
only extend the mask and shift the positions. The file holds PEFT's single tensor ``prompt_embeddings``.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field
from torch import nn

from tuneforge.adapters.model_level import (
    BackboneInputs,
    Finisher,
    ModelAdapter,
    ModelLevelConfig,
    attention_shape,
    backbone_of,
    check_position_budget,
    drop_leading_positions,
    extend_attention_mask,
    new_length,
    past_length,
    shift_position_ids,
    text_config,
)
from tuneforge.errors import AdapterError

PEFT_INITS = {"random": "RANDOM", "text": "TEXT", "sample-vocab": "SAMPLE_VOCAB"}


class PromptTuningConfig(ModelLevelConfig):
    """init: ``random`` (uniform in [-0.5, 0.5], as in the paper), ``text`` (the embeddings of ``init_text``
    tokenized with the model's tokenizer, or of ``init_token_ids``, repeated/truncated to length) or
    ``sample-vocab`` (embeddings of random vocabulary tokens)."""

    method: Literal["prompt-tuning"] = "prompt-tuning"
    num_virtual_tokens: int = Field(20, gt=0)
    init: Literal["random", "text", "sample-vocab"] = "random"
    init_text: str | None = None
    init_token_ids: list[int] | None = None
    tokenizer_name_or_path: str | None = None

    peft_type: ClassVar[str] = "PROMPT_TUNING"
    peft_field_names: ClassVar[dict[str, str]] = {"init": "prompt_tuning_init", "init_text": "prompt_tuning_init_text"}

    def to_peft_dict(self) -> dict[str, Any]:
        data = super().to_peft_dict()
        data["prompt_tuning_init"] = PEFT_INITS[self.init]
        if self.init == "text" and not self.tokenizer_name_or_path:
            # peft refuses TEXT without a tokenizer name; the init is history once the weights are saved.
            data["prompt_tuning_init"] = "RANDOM"
        return data

    @classmethod
    def normalize_peft_values(cls, data: dict[str, Any]) -> dict[str, Any]:
        ours = {peft: name for name, peft in PEFT_INITS.items()}
        if data.get("init") in ours:
            data["init"] = ours[data["init"]]
        if data.get("init") == "text" and not data.get("init_text") and not data.get("init_token_ids"):
            data["init"] = "random"  # the weights come from the file; the init only mattered for training
        return data


class VirtualPromptAdapter(ModelAdapter):
    """Prepends ``prompt()`` (num_virtual_tokens × hidden) to the input embeddings (prompt tuning, P-tuning)."""

    def __init__(self, num_virtual_tokens: int, model_config: Any):
        super().__init__()
        self.num_virtual_tokens = num_virtual_tokens
        self.model_config = model_config

    def prompt(self) -> torch.Tensor:
        raise NotImplementedError

    def before_backbone(self, backbone: nn.Module, inputs: BackboneInputs) -> Finisher | None:
        count = self.num_virtual_tokens
        past = past_length(inputs)
        prefill = past == 0  # later steps find the virtual tokens in the KV cache
        check_position_budget(self.model_config, count, new_length(inputs) + (0 if prefill else past - count))
        extend_attention_mask(inputs, count, virtual_queries=prefill)
        shift_position_ids(inputs, count, prepend=prefill)
        if not prefill:
            return None
        embeds = inputs.pop("inputs_embeds", None)
        if embeds is None:
            embeds = backbone.get_input_embeddings()(inputs["input_ids"])
        prompt = self.prompt().to(embeds.dtype).unsqueeze(0).expand(embeds.shape[0], -1, -1)
        inputs["input_ids"] = None
        inputs["inputs_embeds"] = torch.cat([prompt, embeds], dim=1)
        return drop_leading_positions(count)

    def peft_fields(self) -> dict[str, Any]:
        layers, _, _ = attention_shape(self.model_config)
        return {
            "token_dim": self.model_config.hidden_size, "num_layers": layers,
            "num_attention_heads": self.model_config.num_attention_heads, "num_transformer_submodules": 1,
        }


class PromptTuningAdapter(VirtualPromptAdapter):
    def __init__(self, initial_prompt: torch.Tensor, model_config: Any):
        super().__init__(initial_prompt.shape[0], model_config)
        self.prompt_embeddings = nn.Parameter(initial_prompt)

    def prompt(self) -> torch.Tensor:
        return self.prompt_embeddings

    def file_tensors(self) -> dict[str, torch.Tensor]:
        return {"prompt_embeddings": self.prompt_embeddings}


def attach_prompt_tuning(model: nn.Module, config: PromptTuningConfig, adapter_name: str,
                         tokenizer: Any = None) -> PromptTuningAdapter:
    model_config = text_config(model)
    check_position_budget(model_config, config.num_virtual_tokens, 1)
    embedding = backbone_of(model).get_input_embeddings()
    return PromptTuningAdapter(initial_prompt(embedding, config, tokenizer), model_config)


def initial_prompt(embedding: nn.Module, config: PromptTuningConfig, tokenizer: Any) -> torch.Tensor:
    count, vocab = config.num_virtual_tokens, embedding.weight.shape[0]
    if config.init == "random":
        return torch.empty(count, embedding.weight.shape[1]).uniform_(-0.5, 0.5)
    if config.init == "sample-vocab":
        token_ids = torch.randint(0, vocab, (count,)).tolist()
    else:
        token_ids = init_token_ids(config, tokenizer)
    bad = [t for t in token_ids if not 0 <= t < vocab]
    if bad:
        raise AdapterError(f"prompt-tuning init token ids {bad[:5]} are outside the model's vocabulary "
                           f"(0..{vocab - 1})")
    with torch.no_grad():
        ids = torch.tensor(token_ids, device=embedding.weight.device)
        return embedding(ids).detach().float().cpu().clone()


def init_token_ids(config: PromptTuningConfig, tokenizer: Any) -> list[int]:
    """The init text's token ids, repeated and truncated to ``num_virtual_tokens``."""
    if config.init_token_ids:
        token_ids = list(config.init_token_ids)
    elif config.init_text:
        tokenizer = tokenizer or _tokenizer_from_name(config)
        token_ids = list(tokenizer(config.init_text, add_special_tokens=False)["input_ids"])
    else:
        raise AdapterError("prompt-tuning init='text' needs init_text (or init_token_ids); set adapter.init_text")
    if not token_ids:
        raise AdapterError(f"prompt-tuning init_text {config.init_text!r} gives no tokens; use a non-empty text")
    repeats = math.ceil(config.num_virtual_tokens / len(token_ids))
    return (token_ids * repeats)[:config.num_virtual_tokens]


def _tokenizer_from_name(config: PromptTuningConfig) -> Any:
    if not config.tokenizer_name_or_path:
        raise AdapterError(
            f"prompt-tuning init='text' (init_text={config.init_text!r}) needs a tokenizer: pass "
            "add_adapter(model, config, tokenizer=tokenizer), set adapter.tokenizer_name_or_path, "
            "or give init_token_ids"
        )
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(config.tokenizer_name_or_path)
    except (OSError, ValueError) as exc:
        raise AdapterError(f"cannot load tokenizer_name_or_path={config.tokenizer_name_or_path!r}: {exc}") from None
