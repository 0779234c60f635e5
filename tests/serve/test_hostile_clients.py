"""Hostile and careless clients against a real `tuneforge serve` app on a loopback port (httpx).

Each test drives the server over HTTP. Where a race needs a fixed order of events, the test holds
the engine's lock (`frozen`), which the engine takes for every step: requests can queue and
clients can come and go, but no step runs until the test lets go.
"""

from __future__ import annotations

import contextlib
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import httpx
import pytest
import torch
from safetensors.torch import load_file, save_file
from serve_helpers import chat_model, loopback_server, reference_tokens, save_all_adapters, save_lora

from tuneforge.serve.adapters import AdapterManager
from tuneforge.serve.api import create_app
from tuneforge.serve.engine import Engine

BASE = "tiny-base"
KEY = "user-key"
PROMPTS = ["Hello there", "Tom has 3 apples and buys 4 more. How many", "Which box holds the key?",
           "I am fine, thank you.", "Below is an instruction that describes a task.", "box"]


@pytest.fixture(scope="module")
def served(tmp_path_factory, tokenizer):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    adapters_dir = save_all_adapters(tokenizer, tmp_path_factory.mktemp("adapters"))
    model = chat_model(tokenizer)
    manager = AdapterManager(model, adapters_dir, max_loaded_adapters=6)
    engine = Engine(model, tokenizer, adapters=manager, max_batch_size=4, max_queue=16)
    app = create_app(engine, manager, BASE, api_key=KEY, request_timeout=60)
    with loopback_server(app) as url, httpx.Client(base_url=url, timeout=60,
                                                   headers={"Authorization": f"Bearer {KEY}"}) as http:
        yield SimpleNamespace(url=url, http=http, engine=engine, manager=manager, app=app,
                              adapters_dir=adapters_dir, tokenizer=tokenizer)
    torch.set_num_threads(threads)


# ---- helpers ----------------------------------------------------------------------------------


@contextlib.contextmanager
def frozen(engine):
    """No engine step runs inside this block (the engine takes this lock for each step)."""
    with engine.lock:
        yield


def wait_until(condition, what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.01)


def spy_on_submissions(monkeypatch, engine) -> list:
    """Record the engine's request handles, in submission order."""
    handles = []
    submit = engine.submit

    def recording_submit(*args, **kwargs):
        handle = submit(*args, **kwargs)
        handles.append(handle)
        return handle

    monkeypatch.setattr(engine, "submit", recording_submit)
    return handles


def queue_in_order(served, pool, bodies, path="/v1/completions") -> list:
    """Post each body from a worker thread, waiting until it is queued before posting the next
    (call inside `frozen`, so the queue order is the posting order)."""
    futures = []
    for body in bodies:
        depth = served.engine.scheduler.queue_depth
        futures.append(pool.submit(served.http.post, path, json=body))
        wait_until(lambda: served.engine.scheduler.queue_depth == depth + 1, "the request is queued")
    return futures


def expected_text(served, prompt: str, max_tokens: int, adapter: str | None = None) -> str:
    ids = served.tokenizer(prompt)["input_ids"]
    directory = served.adapters_dir / adapter if adapter else None
    return served.tokenizer.decode(reference_tokens(served.tokenizer, ids, max_tokens, directory),
                                   skip_special_tokens=True)


def error_of(response, status: int) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json"), response.headers["content-type"]
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    return error


def completion(prompt: str, max_tokens: int = 8, model: str = BASE, **extra) -> dict:
    return {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, **extra}


# ---- 1. one request never fails the batch -----------------------------------------------------


def test_a_tiny_temperature_is_greedy_and_fails_no_neighbour(served):
    bodies = [completion(p) for p in PROMPTS[:5]]  # four rows run, one waits
    bodies[1]["temperature"] = 1e-40
    with ThreadPoolExecutor(5) as pool:
        with frozen(served.engine):
            futures = queue_in_order(served, pool, bodies)
        responses = [f.result() for f in futures]
    for prompt, response in zip(PROMPTS, responses):
        assert response.status_code == 200, response.text
        assert response.json()["choices"][0]["text"] == expected_text(served, prompt, 8)


def _save_nan_adapter(served, name: str) -> None:
    directory = served.adapters_dir / name
    save_lora(served.tokenizer, directory, 2, ["q_proj", "v_proj"], 21)
    tensors = load_file(str(directory / "adapter_model.safetensors"))
    key = next(k for k in tensors if "layers.1" in k and "lora_B" in k)
    tensors[key] = torch.full_like(tensors[key], float("nan"))
    save_file(tensors, str(directory / "adapter_model.safetensors"))


def test_non_finite_logits_fail_only_their_own_row(served):
    _save_nan_adapter(served, "nan-weights")
    assert served.http.post("/v1/adapters/load", json={"name": "nan-weights"}).status_code == 200
    bodies = [completion(p) for p in PROMPTS[:4]]
    bodies[2]["model"] = "nan-weights"
    with ThreadPoolExecutor(4) as pool:
        with frozen(served.engine):
            futures = queue_in_order(served, pool, bodies)
        responses = [f.result() for f in futures]
    error = error_of(responses[2], 500)
    assert "non-finite" in error["message"] and error["code"] == "generation_failed"
    for index in (0, 1, 3):
        assert responses[index].status_code == 200, responses[index].text
        assert responses[index].json()["choices"][0]["text"] == expected_text(served, PROMPTS[index], 8)


def test_an_exception_in_one_row_fails_only_that_row(served, monkeypatch):
    from tuneforge.serve import engine as engine_module

    accept = engine_module._Sequence.accept

    def faulty_accept(self, *args, **kwargs):  # a fault injected into one row's token handling
        if "inject-fault" in self.params.stop:
            raise RuntimeError("injected fault")
        return accept(self, *args, **kwargs)

    monkeypatch.setattr(engine_module._Sequence, "accept", faulty_accept)
    bodies = [completion(p) for p in PROMPTS[:5]]
    bodies[0]["stop"] = ["inject-fault"]
    with ThreadPoolExecutor(5) as pool:
        with frozen(served.engine):
            futures = queue_in_order(served, pool, bodies)
        responses = [f.result() for f in futures]
    error = error_of(responses[0], 500)
    assert error["code"] == "generation_failed" and "injected fault" not in error["message"]
    for index in range(1, 5):
        assert responses[index].status_code == 200, responses[index].text
        assert responses[index].json()["choices"][0]["text"] == expected_text(served, PROMPTS[index], 8)


# ---- 5. a request dropped while queued never swaps two users' KV caches ----------------------


def test_a_stream_dropped_while_queued_does_not_swap_two_users_caches(served, monkeypatch):
    long_budget, budget = 20, 12
    long_prompts, (first, second) = PROMPTS[:4], PROMPTS[4:6]
    for prompt in long_prompts:  # they must all end together, on max_tokens, freeing four rows at once
        ids = served.tokenizer(prompt)["input_ids"]
        assert len(reference_tokens(served.tokenizer, ids, long_budget)) == long_budget
    expected = {p: expected_text(served, p, budget) for p in (first, second)}
    assert expected[first] != expected[second], "the two outputs must differ for a swap to show"
    handles = spy_on_submissions(monkeypatch, served.engine)
    with ThreadPoolExecutor(6) as pool:
        with frozen(served.engine):
            longs = queue_in_order(served, pool, [completion(p, long_budget) for p in long_prompts])
            with served.http.stream("POST", "/v1/completions",
                                    json=completion("a stream its client drops", budget, stream=True)) as stream:
                assert next(stream.iter_lines()).startswith("data: ")
            wait_until(lambda: handles[4].cancelled, "the server sees the dropped stream")
            rest = [pool.submit(served.http.post, "/v1/completions", json=completion(p, budget))
                    for p in (first, second)]
            wait_until(lambda: len(handles) == 7, "both requests are queued")
        assert all(f.result().status_code == 200 for f in longs)
        texts = [f.result().json()["choices"][0]["text"] for f in rest]
    assert texts == [expected[first], expected[second]]


# ---- 7. a client that goes away frees its row -------------------------------------------------


def test_a_disconnected_non_streaming_client_is_cancelled(served, monkeypatch):
    handles = spy_on_submissions(monkeypatch, served.engine)
    impatient = httpx.Timeout(30, read=0.5)
    with ThreadPoolExecutor(1) as pool:
        with frozen(served.engine):
            future = pool.submit(served.http.post, "/v1/completions", json=completion(PROMPTS[1], 60),
                                 timeout=impatient)
            with pytest.raises(httpx.ReadTimeout):
                future.result()
            wait_until(lambda: handles and handles[0].cancelled, "the server notices the client left", timeout=5)
    wait_until(lambda: handles[0].done, "the request finishes")
    result = handles[0].result(0)
    assert result.finish_reason == "cancelled" and result.completion_tokens == 0
