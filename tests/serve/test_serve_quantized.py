"""Serving LoRAs over a 4-bit base (QLoRA): the engine's per-row batched deltas run on top of
QuantLinear base layers and give each row the tokens it gets alone with only its adapter active."""

from __future__ import annotations

import pytest
import torch
from serve_helpers import chat_model

from tuneforge.adapters import (
    LoraConfig,
    adapter_parameters,
    add_adapter,
    disabled_adapters,
    set_active_adapters,
    set_trainable_adapter,
)
from tuneforge.adapters.model import wrapped_layers
from tuneforge.eval.generation import stop_token_ids
from tuneforge.quant import QuantLinear, quantize_model
from tuneforge.serve.engine import Engine, GenerationRequest
from tuneforge.serve.sampling import SamplingParams

MAX_TOKENS = 10
# (name, rank, targets, seed): both adapters sit on quantized projections, with different ranks.
ADAPTERS = [("a", 2, ["q_proj", "v_proj"], 21), ("b", 4, ["o_proj", "gate_proj", "down_proj"], 22)]


@pytest.fixture(scope="module")
def quantized_model(tokenizer):
    """The tiny chat Llama in NF4 (lm_head kept in float32, as training does), with two LoRAs whose B is non-zero."""
    model = quantize_model(chat_model(tokenizer), bits=4, quant_type="nf4", compute_dtype=torch.float32)
    for name, rank, targets, seed in ADAPTERS:
        add_adapter(model, LoraConfig(r=rank, alpha=2 * rank, target_modules=targets), name)
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for param in adapter_parameters(model, name).values():  # B starts at zero: move it so the adapter matters
                param.add_(torch.randn(param.shape, generator=generator) * 0.4)
    set_trainable_adapter(model, None)
    return model.eval()


def solo_tokens(model, tokenizer, prompt_ids: list[int], adapter: str | None) -> list[int]:
    """Greedy tokens of one prompt alone through transformers' generate, only ``adapter`` active
    (a 4-bit base cannot take a merged adapter, so the adapter runs unmerged, as in training)."""
    stops = stop_token_ids(model, tokenizer)

    def generate():
        with torch.no_grad():
            out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=MAX_TOKENS, do_sample=False,
                                 eos_token_id=stops, pad_token_id=tokenizer.pad_token_id)
        generated = out[0, len(prompt_ids):].tolist()
        end = next((i for i, t in enumerate(generated) if t in stops), len(generated))
        return generated[:end]

    if adapter is None:
        with disabled_adapters(model):
            return generate()
    set_active_adapters(model, [adapter])
    return generate()


def test_a_batch_mixing_adapters_and_the_base_on_a_4bit_base_equals_each_row_alone(tokenizer, quantized_model):
    model = quantized_model
    layers = dict(wrapped_layers(model))
    assert layers and all(isinstance(layer.base_layer, QuantLinear) for layer in layers.values())
    texts = ["Hello there", "Tom has 3 apples and buys 4 more. How many", "Which box holds the key?",
             "I am fine, thank you.", "box", "Below is an instruction that describes a task."]
    choices = ["a", "b", None, "b", None, "a"]
    requests = [GenerationRequest(tuple(tokenizer(text)["input_ids"]), SamplingParams(max_tokens=MAX_TOKENS), adapter)
                for text, adapter in zip(texts, choices)]

    results = Engine(model, tokenizer, max_batch_size=3).generate(requests)  # rows join and leave mid-batch

    for request, result in zip(requests, results):
        expected = solo_tokens(model, tokenizer, list(request.prompt_ids), request.adapter)
        assert list(result.token_ids) == expected, f"row with adapter {request.adapter}"
        if request.adapter is not None:
            base_only = solo_tokens(model, tokenizer, list(request.prompt_ids), None)
            assert expected != base_only, f"adapter {request.adapter} must change its row's tokens for the test to bite"
    assert sum(len(r.token_ids) for r in results) > 20, "outputs must be long enough for the comparison to bite"
