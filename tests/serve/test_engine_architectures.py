"""The engine on decoder-only models beyond Llama: greedy tokens equal transformers' `generate`.

Tiny random configs of Qwen2 (full, and with sliding-window layers), Qwen3, Mistral and Phi-3 (every
layer sliding) and Gemma 3 (hybrid: sliding and full layers, per-layer-type masks). Windows are 4
tokens and prompt + reply run to 22, so a sliding layer that saw too much would change the tokens.
Rows of different lengths share the batch (padding, slots). Log-probabilities are compared with a
plain forward of the model (Gemma's final logit soft-capping included).
"""

from __future__ import annotations

import pytest
import torch
import transformers

from tuneforge.serve.engine import Engine, GenerationRequest, attention_windows
from tuneforge.serve.sampling import SamplingParams

NEW_TOKENS = 12
PROMPTS = [[5, 17, 33, 8, 9, 10, 11, 12, 40, 41], [7, 8], [3, 4, 5, 6, 30]]


def _common(vocab: int) -> dict:
    return dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=vocab, max_position_embeddings=128, initializer_range=0.2)


CONFIGS = {
    "llama": lambda v: transformers.LlamaConfig(**_common(v)),
    "qwen2": lambda v: transformers.Qwen2Config(**_common(v), tie_word_embeddings=False),
    "qwen2-sliding": lambda v: transformers.Qwen2Config(**_common(v), tie_word_embeddings=False, use_sliding_window=True,
                                                        sliding_window=4, max_window_layers=2),
    "qwen3": lambda v: transformers.Qwen3Config(**_common(v), head_dim=8, tie_word_embeddings=False),
    "mistral": lambda v: transformers.MistralConfig(**_common(v), sliding_window=4),
    "phi3": lambda v: transformers.Phi3Config(**_common(v), pad_token_id=0, sliding_window=4),
    "gemma3": lambda v: transformers.Gemma3TextConfig(
        **_common(v), head_dim=8, sliding_window=4, final_logit_softcapping=5.0,
        layer_types=["sliding_attention", "sliding_attention", "sliding_attention", "full_attention"]),
}


def build(name: str, tokenizer):
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(CONFIGS[name](len(tokenizer))).eval()


@pytest.mark.parametrize("name", list(CONFIGS))
def test_greedy_tokens_equal_transformers_generate(name, tokenizer):
    model = build(name, tokenizer)
    engine = Engine(model, tokenizer, max_batch_size=4)
    requests = [GenerationRequest(tuple(p), SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True, logprobs=True))
                for p in PROMPTS]
    results = engine.generate(requests)
    for prompt, result in zip(PROMPTS, results):
        with torch.no_grad():
            expected = model.generate(torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                                      do_sample=False, pad_token_id=0)[0, len(prompt):].tolist()
            logits = model(torch.tensor([prompt + expected])).logits[0].float()  # (T, V), soft-capped by the model
        assert list(result.token_ids) == expected
        reference = torch.log_softmax(logits, -1)[torch.arange(len(prompt) - 1, len(prompt) - 1 + NEW_TOKENS),
                                                  torch.tensor(expected)]
        assert list(result.logprobs) == pytest.approx(reference.tolist(), abs=1e-4)


def test_window_plans_follow_the_config(tokenizer):
    assert attention_windows(CONFIGS["llama"](8)) is None
    assert attention_windows(CONFIGS["qwen2"](8)) is None
    assert attention_windows(CONFIGS["mistral"](8)) == 4
    assert attention_windows(CONFIGS["gemma3"](8)) == {"sliding_attention": 4, "full_attention": None}
    assert attention_windows(CONFIGS["qwen2-sliding"](8)) == {"sliding_attention": 4, "full_attention": None}


def _embedded_gemma_or_skip():
    from tuneforge.errors import MissingPackageError
    from tuneforge.models.embedded import EMBEDDED_MODELS, require_installed

    try:
        require_installed(EMBEDDED_MODELS["gemma3-270m"])
    except MissingPackageError:
        pytest.skip("the embedded Gemma 3 270M packages are not installed")
    from tuneforge.models import load_model

    return load_model("gemma3-270m")


def test_embedded_gemma3_greedy_equals_generate_and_stops_on_the_chatml_marker():
    """Gemma 3 270M has no chat template and no <|im_end|> token: the chatml fallback's marker is a
    stop string there, and the engine's greedy tokens equal generate's."""
    loaded = _embedded_gemma_or_skip()
    model, tokenizer = loaded.model.eval(), loaded.tokenizer
    engine = Engine(model, tokenizer, max_batch_size=2)
    assert "<|im_end|>" in engine.end_of_turn.strings
    prompt = tokenizer("The capital of France is", add_special_tokens=True)["input_ids"]
    [result] = engine.generate([GenerationRequest(tuple(prompt), SamplingParams(max_tokens=8, ignore_eos=True))])
    with torch.no_grad():
        expected = model.generate(torch.tensor([prompt]), max_new_tokens=8, min_new_tokens=8, do_sample=False)
    assert list(result.token_ids) == expected[0, len(prompt):].tolist()
