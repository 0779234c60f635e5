"""The HTTP API: OpenAI shapes, streaming, adapters by `model`, and every error status."""

from __future__ import annotations

import json
import threading
import time

import pytest
from fastapi.testclient import TestClient
from serve_helpers import chat_model, reference_tokens, save_all_adapters

from tuneforge.eval.generation import PromptFormat
from tuneforge.data import Message
from tuneforge.serve.adapters import AdapterManager
from tuneforge.serve.api import create_app
from tuneforge.serve.engine import Engine

BASE = "tiny-base"


@pytest.fixture(scope="module")
def adapters_dir(tmp_path_factory, tokenizer):
    return save_all_adapters(tokenizer, tmp_path_factory.mktemp("adapters"))


def make_client(tokenizer, adapters_dir, *, api_key=None, max_batch_size=4, max_queue=16, max_loaded=4,
                request_timeout=60.0) -> TestClient:
    model = chat_model(tokenizer)
    manager = AdapterManager(model, adapters_dir, max_loaded_adapters=max_loaded)
    engine = Engine(model, tokenizer, adapters=manager, max_batch_size=max_batch_size, max_queue=max_queue)
    return TestClient(create_app(engine, manager, BASE, api_key=api_key, request_timeout=request_timeout))


@pytest.fixture(scope="module")
def client(tokenizer, adapters_dir):
    with make_client(tokenizer, adapters_dir) as test_client:
        yield test_client


def _error(response, status):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    return error


def _sse_payloads(response) -> list:
    lines = [line for line in response.text.split("\n\n") if line.strip()]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"
    return [json.loads(line[len("data: "):]) for line in lines[:-1]]


def test_models_lists_the_base_and_each_adapter_with_its_parent(client):
    data = client.get("/v1/models").json()["data"]
    assert [(m["id"], m["parent"]) for m in data] == [(BASE, None), ("alpha", BASE), ("beta", BASE), ("gamma", BASE)]


def test_completion_equals_greedy_generation_with_the_adapter_merged(client, tokenizer, adapters_dir):
    prompt = "Tom has 3 apples"
    ids = tokenizer(prompt)["input_ids"]
    for model in (BASE, "beta"):
        body = client.post("/v1/completions", json={"model": model, "prompt": prompt, "max_tokens": 8,
                                                    "temperature": 0}).json()
        expected = reference_tokens(tokenizer, ids, 8, adapters_dir / model if model != BASE else None)
        assert body["object"] == "text_completion" and body["model"] == model
        assert body["choices"][0]["text"] == tokenizer.decode(expected, skip_special_tokens=True)
        assert body["usage"] == {"prompt_tokens": len(ids), "completion_tokens": len(expected),
                                 "total_tokens": len(ids) + len(expected)}


def test_chat_streaming_and_non_streaming_give_the_same_text(client, tokenizer, adapters_dir):
    messages = [{"role": "user", "content": "How many apples does Tom have now?"}]
    request = {"model": "alpha", "messages": messages, "max_tokens": 12, "temperature": 0}
    whole = client.post("/v1/chat/completions", json=request).json()
    text = whole["choices"][0]["message"]["content"]
    prompt = PromptFormat.for_tokenizer("auto", tokenizer).encode([Message("user", messages[0]["content"])], tokenizer)
    assert text == tokenizer.decode(reference_tokens(tokenizer, prompt, 12, adapters_dir / "alpha"),
                                    skip_special_tokens=True)
    assert text, "the reply must not be empty for the comparison to bite"

    streamed = client.post("/v1/chat/completions", json={**request, "stream": True})
    assert streamed.headers["content-type"].startswith("text/event-stream")
    chunks = _sse_payloads(streamed)
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == text
    assert chunks[-1]["choices"][0]["finish_reason"] == whole["choices"][0]["finish_reason"]


def test_completion_stream_stop_string_and_logprobs(client):
    request = {"model": BASE, "prompt": "Hello there", "max_tokens": 10, "temperature": 0, "logprobs": 0}
    whole = client.post("/v1/completions", json=request).json()["choices"][0]
    assert len(whole["logprobs"]["token_logprobs"]) == len(whole["logprobs"]["tokens"]) > 0
    assert all(value <= 0 for value in whole["logprobs"]["token_logprobs"])
    chunks = _sse_payloads(client.post("/v1/completions", json={**request, "stream": True,
                                                                "stream_options": {"include_usage": True}}))
    assert "".join(c["choices"][0]["text"] for c in chunks[:-1]) == whole["text"]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == len(whole["logprobs"]["tokens"])
    stop = whole["text"][2:4]
    stopped = client.post("/v1/completions", json={**request, "stop": [stop]}).json()["choices"][0]
    assert stopped["text"] == whole["text"][: whole["text"].find(stop)] and stopped["finish_reason"] == "stop"


def test_adapters_load_pin_and_unload_at_run_time(client):
    loaded = client.post("/v1/adapters/load", json={"name": "gamma", "pin": True}).json()
    assert loaded["status"] == "loaded" and loaded["pinned"] is True
    metrics = client.get("/metrics").text
    assert "tuneforge_adapters_loaded" in metrics and "# TYPE tuneforge_request_latency_seconds histogram" in metrics
    unloaded = client.post("/v1/adapters/unload", json={"name": "gamma"}).json()
    assert unloaded == {"name": "gamma", "status": "unloaded", "in_use": 0}
    _error(client.post("/v1/adapters/unload", json={"name": "gamma"}), 404)
    assert client.get("/health").json()["status"] == "ok"


def test_metrics_are_prometheus_text_with_counts(client):
    client.post("/v1/completions", json={"model": BASE, "prompt": "Hi", "max_tokens": 3, "temperature": 0})
    text = client.get("/metrics").text
    values = {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines() if not line.startswith("#")}
    assert values["tuneforge_generated_tokens_total"] >= 1
    assert values["tuneforge_request_latency_seconds_count"] >= 1
    assert values['tuneforge_request_latency_seconds_bucket{le="+Inf"}'] == values["tuneforge_request_latency_seconds_count"]
    assert {"tuneforge_queue_depth", "tuneforge_running_batch_size", "tuneforge_generated_tokens_per_second"} <= set(values)


@pytest.mark.parametrize("body, param", [
    ({"model": BASE, "prompt": "Hi", "temperature": -1}, "temperature"),
    ({"model": BASE, "prompt": "Hi", "max_tokens": 0}, "max_tokens"),
    ({"model": BASE}, "prompt"),
    ({"model": BASE, "prompt": "Hi", "n": 2}, "n"),
])
def test_invalid_bodies_are_400(client, body, param):
    assert _error(client.post("/v1/completions", json=body), 400)["param"] == param


def test_bad_values_unknown_models_and_escaping_names(client, tokenizer):
    assert "context" in _error(client.post("/v1/completions", json={"model": BASE, "prompt": "Hi", "max_tokens": 100_000}), 400)["message"]
    assert _error(client.post("/v1/chat/completions", json={"model": "nope", "messages": [{"role": "user", "content": "x"}]}), 404)["code"] == "model_not_found"
    for name in ("../alpha", "/etc", "a/b", ".."):
        _error(client.post("/v1/completions", json={"model": name, "prompt": "Hi"}), 400)
        _error(client.post("/v1/adapters/load", json={"name": name}), 400)


def test_api_key_is_required_when_set(tokenizer, adapters_dir):
    with make_client(tokenizer, adapters_dir, api_key="sekret") as keyed:
        request = {"model": BASE, "prompt": "Hi", "max_tokens": 2}
        assert _error(keyed.post("/v1/completions", json=request), 401)["code"] == "invalid_api_key"
        _error(keyed.post("/v1/completions", json=request, headers={"Authorization": "Bearer wrong"}), 401)
        _error(keyed.get("/v1/models"), 401)
        assert keyed.post("/v1/completions", json=request, headers={"Authorization": "Bearer sekret"}).status_code == 200
        assert keyed.get("/health").status_code == 200


def test_a_full_queue_is_429_and_the_waiting_request_still_finishes(tokenizer, adapters_dir):
    with make_client(tokenizer, adapters_dir, max_batch_size=1, max_queue=1) as small:
        engine = small.app.state.service.engine
        request = {"model": BASE, "prompt": "Hi", "max_tokens": 3, "temperature": 0}
        answers = []
        with engine.lock:  # the engine cannot step, so the first request stays queued
            waiting = threading.Thread(target=lambda: answers.append(small.post("/v1/completions", json=request)))
            waiting.start()
            deadline = time.monotonic() + 10
            while engine.scheduler.queue_depth < 1 and time.monotonic() < deadline:
                time.sleep(0.01)
            assert _error(small.post("/v1/completions", json=request), 429)["code"] == "queue_full"
        waiting.join(30)
        assert answers[0].status_code == 200


def test_busy_adapters_and_timeouts_are_503(tokenizer, adapters_dir):
    with make_client(tokenizer, adapters_dir, max_loaded=1, request_timeout=0.05) as busy:
        assert busy.post("/v1/adapters/load", json={"name": "alpha", "pin": True}).status_code == 200
        error = _error(busy.post("/v1/completions", json={"model": "beta", "prompt": "Hi", "max_tokens": 2}), 503)
        assert error["code"] == "adapters_busy" and "max-loaded-adapters" in error["message"]
        engine = busy.app.state.service.engine
        with engine.lock:  # nothing can finish while the engine is held
            error = _error(busy.post("/v1/completions", json={"model": BASE, "prompt": "Hi", "max_tokens": 2}), 503)
        assert error["code"] == "timeout"
