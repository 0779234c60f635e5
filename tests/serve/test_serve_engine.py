"""The engine: continuous batching gives each row exactly its solo tokens, with any mix of adapters."""

from __future__ import annotations

import threading

import pytest
import torch
from serve_helpers import ADAPTERS, chat_model, chat_tokenizer, reference_tokens, save_all_adapters
from tiny_models import perturb_trainable

from tuneforge.adapters import LoraConfig, add_adapter
from tuneforge.adapters.model import wrapped_layers
from tuneforge.errors import ConfigError
from tuneforge.serve.adapters import AdapterManager, UnknownAdapterError
from tuneforge.serve.engine import Engine, GenerationRequest, RequestError
from tuneforge.serve.sampling import SamplingParams, filtered_probabilities
from tuneforge.serve.scheduler import QueueFullError


@pytest.fixture(scope="module")
def adapters_dir(tmp_path_factory, tokenizer):
    return save_all_adapters(tokenizer, tmp_path_factory.mktemp("adapters"))


def _prompts(tokenizer):
    texts = ["Hello there", "Tom has 3 apples and buys 4 more. How many", "Which box holds the key?",
             "I am fine, thank you.", "Below is an instruction that describes a task.", "box"]
    return [tokenizer(text)["input_ids"] for text in texts]


def test_rows_of_different_lengths_get_their_solo_greedy_tokens(tokenizer):
    engine = Engine(chat_model(tokenizer), tokenizer, max_batch_size=3)  # 6 requests: rows join and leave
    prompts = _prompts(tokenizer)
    budgets = [12, 5, 9, 14, 3, 10]
    results = engine.generate([GenerationRequest(tuple(p), SamplingParams(max_tokens=n)) for p, n in zip(prompts, budgets)])
    for prompt, budget, result in zip(prompts, budgets, results):
        expected = reference_tokens(tokenizer, prompt, budget)
        assert list(result.token_ids) == expected
        assert result.finish_reason == ("length" if len(expected) == budget else "stop")
    assert sum(len(r.token_ids) for r in results) > 30, "outputs must be long enough for the comparison to bite"


def test_a_batch_mixing_adapters_and_the_base_equals_each_row_alone_merged(tokenizer, adapters_dir):
    model = chat_model(tokenizer)
    engine = Engine(model, tokenizer, adapters=AdapterManager(model, adapters_dir), max_batch_size=3)  # rows join and leave
    names = [name for name, *_ in ADAPTERS]
    prompts = _prompts(tokenizer)
    choices = [names[0], None, names[1], names[2], names[0], None, names[2], names[1]]
    requests = [GenerationRequest(tuple(prompts[i % len(prompts)]), SamplingParams(max_tokens=10), adapter)
                for i, adapter in enumerate(choices)]
    results = engine.generate(requests)
    solo = {}
    for request, result in zip(requests, results):
        directory = adapters_dir / request.adapter if request.adapter else None
        expected = reference_tokens(tokenizer, list(request.prompt_ids), 10, directory)
        solo[(request.prompt_ids, request.adapter)] = expected
        assert list(result.token_ids) == expected, f"row with adapter {request.adapter}"
    base_outputs = {p: tokens for (p, adapter), tokens in solo.items() if adapter is None}
    differs = [solo[key] != base_outputs.get(key[0]) for key in solo if key[1] and key[0] in base_outputs]
    assert differs and all(differs), "each adapter must change its row's tokens for the test to bite"
    assert all(r.finish_reason for r in results)


def test_batched_lora_delta_equals_the_naive_formula_row_by_row():
    """The gathered (BGMV) computation against out + s·B A x evaluated row by row."""
    layer_model = chat_model(chat_tokenizer())
    for name, rank in (("a", 2), ("b", 8), ("c", 4)):
        add_adapter(layer_model, LoraConfig(r=rank, alpha=3 * rank, target_modules=["q_proj"]), name)
    perturb_trainable(layer_model, scale=0.3)
    layer = layer_model.model.layers[0].self_attn.q_proj
    rows = ("b", None, "a", "c", "b")
    x = torch.randn(len(rows), 3, 48, generator=torch.Generator().manual_seed(0))
    layer.row_adapters = rows
    with torch.no_grad():
        batched = layer(x)
        stacks = layer._row_stacks
        again = layer(x)
    expected = []
    for row, name in enumerate(rows):
        out = layer.base_layer(x[row])
        if name is not None:
            adapter = layer.adapters[name]
            out = out + (x[row] @ adapter.lora_A.T @ adapter.lora_B.T) * adapter.scaling
        expected.append(out)
    torch.testing.assert_close(batched, torch.stack(expected), atol=1e-5, rtol=1e-5)
    assert layer._row_stacks is stacks and torch.equal(again, batched), "an unchanged adapter set must not restack"
    with torch.no_grad():
        layer.adapters["c"].lora_B.add_(1.0)  # "c" was added last, so it is the trainable one
        changed = layer(x)
    assert layer._row_stacks is not stacks and not torch.allclose(changed[3], batched[3])
    torch.testing.assert_close(changed[:3], batched[:3])


def test_seeded_sampling_does_not_depend_on_the_batch(tokenizer):
    engine = Engine(chat_model(tokenizer), tokenizer, max_batch_size=4)
    prompt = tuple(_prompts(tokenizer)[1])
    seeded = SamplingParams(max_tokens=12, temperature=1.5, top_p=0.95, top_k=50, seed=7)
    alone = engine.generate([GenerationRequest(prompt, seeded)])[0]
    crowd = engine.generate([GenerationRequest(tuple(p), SamplingParams(max_tokens=12, temperature=1.0, seed=i))
                             for i, p in enumerate(_prompts(tokenizer)[:3])] + [GenerationRequest(prompt, seeded)])
    assert crowd[-1].token_ids == alone.token_ids
    other_seed = engine.generate([GenerationRequest(prompt, SamplingParams(max_tokens=12, temperature=1.5, seed=8))])[0]
    assert other_seed.token_ids != alone.token_ids


def test_top_k_one_is_greedy_and_top_p_keeps_the_smallest_top_set(tokenizer):
    engine = Engine(chat_model(tokenizer), tokenizer)
    prompt = tuple(_prompts(tokenizer)[0])
    greedy = engine.generate([GenerationRequest(prompt, SamplingParams(max_tokens=8))])[0]
    top1 = engine.generate([GenerationRequest(prompt, SamplingParams(max_tokens=8, temperature=2.0, top_k=1, seed=3))])[0]
    assert top1.token_ids == greedy.token_ids

    logits = torch.tensor([2.0, 1.0, 0.5, -1.0, 0.0])
    probs = torch.softmax(logits, dim=-1)
    kept = filtered_probabilities(logits, SamplingParams(temperature=1.0, top_p=0.8))
    order = torch.argsort(probs, descending=True).tolist()  # naive: add tokens until the mass reaches p
    keep, mass = [], 0.0
    for token in order:
        keep.append(token)
        mass += float(probs[token])
        if mass >= 0.8:
            break
    expected = torch.zeros_like(probs)
    expected[keep] = probs[keep] / probs[keep].sum()
    torch.testing.assert_close(kept, expected)
    top2 = filtered_probabilities(logits, SamplingParams(temperature=0.5, top_k=2))
    assert (top2 > 0).sum() == 2 and top2[0] > top2[1] > 0


def test_logprobs_are_those_of_the_chosen_tokens(tokenizer):
    model = chat_model(tokenizer)
    engine = Engine(model, tokenizer)
    prompt = list(_prompts(tokenizer)[2])
    result = engine.generate([GenerationRequest(tuple(prompt), SamplingParams(max_tokens=6, logprobs=True))])[0]
    ids = torch.tensor([prompt + list(result.token_ids)])
    with torch.no_grad():
        log_probs = torch.log_softmax(model(ids).logits[0].float(), dim=-1)
    expected = [float(log_probs[len(prompt) - 1 + i, t]) for i, t in enumerate(result.token_ids)]
    assert result.logprobs == pytest.approx(expected, abs=1e-4)


def test_stop_strings_trim_the_text_and_streaming_adds_up_to_it(tokenizer):
    engine = Engine(chat_model(tokenizer), tokenizer)
    prompt = tuple(_prompts(tokenizer)[3])
    free = engine.generate([GenerationRequest(prompt, SamplingParams(max_tokens=16))])[0]
    assert len(free.text) > 6
    stop = free.text[3:5]
    cut = free.text.find(stop)
    handle = engine.submit(GenerationRequest(prompt, SamplingParams(max_tokens=16, stop=["never-there", stop])))
    while not handle.done:
        engine.step()
    deltas = list(handle.deltas())
    result = handle.result()
    assert result.text == free.text[:cut] and result.finish_reason == "stop"
    assert "".join(d.text for d in deltas) == result.text
    assert deltas[-1].finish_reason == "stop" and all(d.finish_reason is None for d in deltas[:-1])


def test_bad_requests_and_a_full_queue_are_refused(tokenizer):
    engine = Engine(chat_model(tokenizer), tokenizer, max_batch_size=1, max_queue=2, max_model_len=64)
    with pytest.raises(RequestError, match="empty"):
        engine.submit(GenerationRequest((), SamplingParams()))
    with pytest.raises(RequestError, match="exceeds the model's context of 64"):
        engine.submit(GenerationRequest((5,) * 60, SamplingParams(max_tokens=5)))
    with pytest.raises(RequestError, match=r"\[0, "):
        engine.submit(GenerationRequest((5, 10_000), SamplingParams()))
    with pytest.raises(ConfigError, match="temperature=-1"):
        SamplingParams(temperature=-1)
    with pytest.raises(ConfigError, match="top_p=0"):
        SamplingParams(top_p=0)
    with pytest.raises(UnknownAdapterError, match="no adapter named 'alpha' \\(it has none\\)"):
        engine.submit(GenerationRequest((5,), SamplingParams(), adapter="alpha"))
    engine.submit(GenerationRequest((5,), SamplingParams()))
    engine.submit(GenerationRequest((6,), SamplingParams()))
    with pytest.raises(QueueFullError, match="queue is full"):
        engine.submit(GenerationRequest((7,), SamplingParams()))


def test_engine_thread_streams_to_callbacks_and_cancel_stops_a_request(tokenizer):
    engine = Engine(chat_model(tokenizer), tokenizer, max_batch_size=2)
    prompt = tuple(_prompts(tokenizer)[0])
    expected = engine.generate([GenerationRequest(prompt, SamplingParams(max_tokens=10))])[0]
    pieces, finished = [], threading.Event()

    def on_delta(delta):
        pieces.append(delta.text)
        if delta.finish_reason:
            finished.set()

    engine.start()
    try:
        handle = engine.submit(GenerationRequest(prompt, SamplingParams(max_tokens=10)), on_delta=on_delta)
        assert handle.result(timeout=30).text == expected.text
        assert finished.wait(5) and "".join(pieces) == expected.text
        long = engine.submit(GenerationRequest(prompt, SamplingParams(max_tokens=60, stop=["\u2603"])))
        long.cancel()
        assert long.result(timeout=30).finish_reason in ("cancelled", "stop")
    finally:
        engine.stop()
    assert not list(wrapped_layers(engine.model))
