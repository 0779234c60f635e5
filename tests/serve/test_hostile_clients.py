"""Hostile and careless clients against a real `tuneforge serve` app on a loopback port (httpx).

Each test drives the server over HTTP. Where a race needs a fixed order of events, the test holds
the engine's lock (`frozen`), which the engine takes for every step: requests can queue and
clients can come and go, but no step runs until the test lets go.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import threading
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


# ---- 2. an adapter never writes the shared base weights ---------------------------------------

WRAPPED_BASE_KEY = "base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight"  # alpha wraps q_proj
STRAY_BASE_KEY = "base_model.model.model.layers.0.mlp.up_proj.base_layer.weight"  # no adapter wraps up_proj


def _adapter_with_extra_tensors(served, name: str, keys: list[str]) -> None:
    directory = served.adapters_dir / name
    shutil.copytree(served.adapters_dir / "alpha", directory)
    tensors = load_file(str(directory / "adapter_model.safetensors"))
    reference = chat_model(served.tokenizer)
    for key in keys:
        module = key.removeprefix("base_model.model.").removesuffix(".base_layer.weight")
        tensors[key] = torch.randn_like(reference.get_submodule(module).weight) * 3
    save_file(tensors, str(directory / "adapter_model.safetensors"))


@pytest.mark.parametrize("name, keys", [
    ("writes-base", [WRAPPED_BASE_KEY]),
    ("stray-base", [STRAY_BASE_KEY]),
    ("writes-then-stray", [WRAPPED_BASE_KEY, STRAY_BASE_KEY]),
])
def test_an_adapter_holding_base_weights_is_refused_and_the_base_stays_intact(served, name, keys):
    _adapter_with_extra_tensors(served, name, keys)
    error = error_of(served.http.post("/v1/adapters/load", json={"name": name}), 400)
    assert any(key in error["message"] for key in keys), error["message"]
    error = error_of(served.http.post("/v1/completions", json=completion(PROMPTS[0], model=name)), 400)
    assert any(key in error["message"] for key in keys), error["message"]
    base = served.http.post("/v1/completions", json=completion(PROMPTS[0])).json()
    assert base["choices"][0]["text"] == expected_text(served, PROMPTS[0], 8)
    assert name not in [entry["name"] for entry in served.manager.loaded()]


def test_library_loading_checks_every_base_override_before_writing_any(served):
    """`load_adapter` itself (used outside the server too) leaves the base untouched when any tensor is bad."""
    from tuneforge.adapters import load_adapter
    from tuneforge.errors import AdapterError

    _adapter_with_extra_tensors(served, "library-writes-then-stray", [WRAPPED_BASE_KEY, STRAY_BASE_KEY])
    model = chat_model(served.tokenizer)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(AdapterError, match="up_proj.base_layer.weight"):
        load_adapter(model, served.adapters_dir / "library-writes-then-stray")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


# ---- 3. any number a client sends is bounded; no answer is ever a bare 500 ---------------------


@pytest.mark.parametrize("field, param", [
    ('"seed": 18446744073709551616', "seed"),
    ('"seed": -9223372036854775809', "seed"),
    ('"temperature": NaN', "temperature"),
    ('"temperature": Infinity', "temperature"),
    ('"top_p": NaN', "top_p"),
    ('"max_tokens": 100000000000000000000000000000000', "max_tokens"),
    ('"top_k": 100000000000000000000000000000000', "top_k"),
    ('"logprobs": 100000000000000000000000000000000', "logprobs"),
])
def test_out_of_range_numbers_are_json_400s_naming_the_field(served, field, param):
    raw = '{"model": "%s", "prompt": "hi", "max_tokens": 2, %s}' % (BASE, field)
    response = served.http.post("/v1/completions", content=raw, headers={"content-type": "application/json"})
    assert error_of(response, 400)["param"] == param


def test_chat_content_parts_of_the_wrong_type_are_a_json_400(served):
    body = {"model": BASE, "max_tokens": 2, "messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]}
    error_of(served.http.post("/v1/chat/completions", json=body), 400)


def test_an_unexpected_error_is_a_json_500_with_a_request_id_and_the_traceback_only_in_the_log(
        served, monkeypatch, caplog):
    from tuneforge.serve import api

    def broken(*args, **kwargs):
        raise RuntimeError("secret internal detail")

    monkeypatch.setattr(api.Service, "sampling", broken)
    with caplog.at_level(logging.ERROR):
        response = served.http.post("/v1/completions", json=completion("hi"))
    error = error_of(response, 500)
    request_id = response.headers["x-request-id"]
    assert error["type"] == "server_error" and request_id in error["message"]
    assert "secret internal detail" not in response.text and "Traceback" not in response.text
    logged = [r for r in caplog.records if request_id in r.getMessage()]
    assert logged and logged[0].exc_info and "secret internal detail" in str(logged[0].exc_info[1])


# ---- 4. model-level adapters: virtual tokens served per row, the others refused ---------------


def _model_level_configs():
    from tuneforge.adapters.model_level.adaption_prompt import AdaptionPromptConfig
    from tuneforge.adapters.model_level.p_tuning import PTuningConfig
    from tuneforge.adapters.model_level.prefix_tuning import PrefixTuningConfig
    from tuneforge.adapters.model_level.prompt_tuning import PromptTuningConfig
    from tuneforge.adapters.model_level.reft import DiReftConfig, LoReftConfig

    return {
        "prompt-tuning": PromptTuningConfig(num_virtual_tokens=4),
        "p-tuning": PTuningConfig(num_virtual_tokens=3, encoder_hidden_size=8),
        "prefix-tuning": PrefixTuningConfig(num_virtual_tokens=3),
        "adaption-prompt": AdaptionPromptConfig(adapter_len=4, adapter_layers=2),
        "loreft": LoReftConfig(layers=[0], positions="f1+l1", r=2),
        "direft": DiReftConfig(layers="all", positions="l3", r=2),
    }


def _save_model_level(served, method: str) -> str:
    from tuneforge.adapters import add_adapter, save_adapter

    name = f"model-level-{method}"
    if not (served.adapters_dir / name).exists():
        model = chat_model(served.tokenizer)
        torch.manual_seed(5)
        add_adapter(model, _model_level_configs()[method], "default")
        save_adapter(model, served.adapters_dir / name, "default")
    return name


@pytest.mark.parametrize("method", ["prefix-tuning", "adaption-prompt", "loreft", "direft"])
def test_model_level_adapters_the_engine_cannot_apply_per_row_are_refused_naming_the_method(served, method):
    name = _save_model_level(served, method)
    error = error_of(served.http.post("/v1/adapters/load", json={"name": name}), 400)
    assert method in error["message"] and error["code"] == "invalid_adapter"
    error = error_of(served.http.post("/v1/chat/completions", json={
        "model": name, "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]}), 400)
    assert method in error["message"]
    assert name not in [entry["name"] for entry in served.manager.loaded()]


def _solo_with_adapter(served, directory, prompt: str, max_tokens: int) -> str:
    """Greedy tokens of one prompt alone, through transformers' generate with the adapter active."""
    from tuneforge.adapters import load_adapter
    from tuneforge.eval.generation import stop_token_ids

    model = chat_model(served.tokenizer)
    load_adapter(model, directory)
    ids = served.tokenizer(prompt)["input_ids"]
    stops = stop_token_ids(model, served.tokenizer)
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=max_tokens, do_sample=False, eos_token_id=stops,
                             pad_token_id=served.tokenizer.pad_token_id)
    generated = out[0, len(ids):].tolist()
    generated = generated[:next((i for i, t in enumerate(generated) if t in stops), len(generated))]
    return served.tokenizer.decode(generated, skip_special_tokens=True)


def test_prompt_tuning_and_p_tuning_are_served_per_row_beside_lora_and_the_base(served):
    names = {method: _save_model_level(served, method) for method in ("prompt-tuning", "p-tuning")}
    rows = [(PROMPTS[0], names["prompt-tuning"]), (PROMPTS[1], None), (PROMPTS[2], names["p-tuning"]),
            (PROMPTS[3], "alpha"), (PROMPTS[4], names["prompt-tuning"]), (PROMPTS[5], names["p-tuning"])]
    for name in {*names.values(), "alpha"}:  # loaded before the engine is held still
        assert served.http.post("/v1/adapters/load", json={"name": name}).status_code == 200
    with ThreadPoolExecutor(len(rows)) as pool:
        with frozen(served.engine):  # four rows prefill together, two join as rows finish
            futures = queue_in_order(served, pool, [completion(p, 10, model=m or BASE) for p, m in rows])
        responses = [f.result() for f in futures]
    for (prompt, name), response in zip(rows, responses):
        assert response.status_code == 200, response.text
        text = response.json()["choices"][0]["text"]
        if name is None or name == "alpha":
            assert text == expected_text(served, prompt, 10, name)
        else:
            assert text == _solo_with_adapter(served, served.adapters_dir / name, prompt, 10), name
            assert text != expected_text(served, prompt, 10), "the virtual tokens must change the output"


def test_an_engine_without_a_manager_refuses_a_hand_added_model_level_adapter(served):
    from tuneforge.adapters import add_adapter
    from tuneforge.serve.engine import GenerationRequest, RequestError

    model = chat_model(served.tokenizer)
    add_adapter(model, _model_level_configs()["loreft"], "reft", activate=False)
    engine = Engine(model, served.tokenizer, max_batch_size=2)
    with pytest.raises(RequestError, match="loreft"):
        engine.submit(GenerationRequest((1, 2, 3), adapter="reft"))


# ---- 6. big or many-message bodies never stall the event loop ---------------------------------


def chat(messages, **extra) -> dict:
    return {"model": BASE, "max_tokens": 2, "temperature": 0, "messages": messages, **extra}


def test_health_answers_while_a_chat_is_rendered(served, monkeypatch):
    from tuneforge.serve import api

    rendering = threading.Event()
    encode = api.Service.encode_chat

    def slow_encode(self, messages):  # stands for a long chat's template rendering
        rendering.set()
        time.sleep(1.5)
        return encode(self, messages)

    monkeypatch.setattr(api.Service, "encode_chat", slow_encode)
    with ThreadPoolExecutor(1) as pool:
        future = pool.submit(served.http.post, "/v1/chat/completions", json=chat([{"role": "user", "content": "hi"}]))
        assert rendering.wait(10)
        started = time.monotonic()
        assert served.http.get("/health").status_code == 200
        assert time.monotonic() - started < 0.75, "the event loop waited for the rendering"
        assert future.result().status_code == 200


def test_twenty_thousand_messages_are_refused_before_rendering(served):
    messages = [{"role": "user" if i % 2 else "assistant", "content": "hello there"} for i in range(20_000)]
    started = time.monotonic()
    response = served.http.post("/v1/chat/completions", json=chat(messages), timeout=20)
    assert error_of(response, 400)["param"] == "messages"
    assert time.monotonic() - started < 5


def test_a_body_over_the_size_bound_is_413(served):
    response = served.http.post("/v1/completions", json=completion("x" * (3 * 1024 * 1024)))
    assert error_of(response, 413)["code"] == "body_too_large"


@pytest.mark.parametrize("stop", [[f"s{i}" for i in range(17)], ["x" * 257]])
def test_too_many_or_too_long_stop_strings_are_400(served, stop):
    assert error_of(served.http.post("/v1/completions", json=completion("hi", stop=stop)), 400)["param"] == "stop"


def test_a_prompt_longer_than_the_context_can_hold_is_refused_before_rendering(served, monkeypatch):
    from tuneforge.serve import api

    rendered = []
    monkeypatch.setattr(api.Service, "encode_chat", lambda self, messages: rendered.append(1) or [1])
    too_long = "word " * (32 * served.engine.max_model_len // 5 + 1)
    response = served.http.post("/v1/chat/completions", json=chat([{"role": "user", "content": too_long}]))
    assert error_of(response, 400)["code"] == "context_length_exceeded" and rendered == []


# ---- 8. keys, exposure, paths -----------------------------------------------------------------


@pytest.mark.parametrize("path", ["/metrics", "/docs", "/openapi.json"])
def test_metrics_docs_and_schema_need_the_key_but_health_does_not(served, path):
    anonymous = httpx.get(served.url + path)
    assert error_of(anonymous, 401)["code"] == "invalid_api_key"
    assert served.http.get(path).status_code == 200
    assert httpx.get(served.url + "/health").status_code == 200


ADMIN = "admin-key"


@pytest.fixture(scope="module")
def admin_served(served):
    """A second app on the same engine with a separate admin key."""
    app = create_app(served.engine, served.manager, BASE, api_key=KEY, admin_key=ADMIN)
    with loopback_server(app) as url:
        yield url


def test_adapter_routes_need_the_admin_key(admin_served):
    user = {"Authorization": f"Bearer {KEY}"}
    admin = {"Authorization": f"Bearer {ADMIN}"}
    for route in ("/v1/adapters/load", "/v1/adapters/unload"):
        assert error_of(httpx.post(admin_served + route, json={"name": "beta"}), 401)["code"] == "invalid_api_key"
        assert error_of(httpx.post(admin_served + route, json={"name": "beta"}, headers=user), 403)["code"] == "admin_key_required"
    assert httpx.post(admin_served + "/v1/adapters/load", json={"name": "beta", "pin": True}, headers=admin, timeout=30).status_code == 200
    assert httpx.post(admin_served + "/v1/adapters/unload", json={"name": "beta"}, headers=admin, timeout=30).status_code == 200
    for headers in (user, admin):  # the admin key serves completions too
        response = httpx.post(admin_served + "/v1/completions", json=completion("hi", 2), headers=headers, timeout=30)
        assert response.status_code == 200, response.text


@pytest.mark.parametrize("keys", [{"api_key": ""}, {"api_key": KEY, "admin_key": ""}, {"admin_key": ""}])
def test_empty_keys_are_refused(served, keys):
    from tuneforge.errors import ConfigError

    with pytest.raises(ConfigError, match="empty"):
        create_app(served.engine, served.manager, BASE, **keys)


@pytest.mark.parametrize("argv", [["--api-key", ""], ["--admin-key", ""], ["--api-key", "k", "--admin-key", ""]])
def test_the_cli_refuses_an_empty_key_before_loading_the_model(monkeypatch, capsys, argv):
    from tuneforge.cli import main
    from tuneforge.serve import command

    def never(*args, **kwargs):
        raise AssertionError("the model must not load")

    monkeypatch.setattr(command, "load_model", never)
    assert main(["serve", *argv]) == 2
    assert "empty" in capsys.readouterr().err


def test_the_cli_refuses_an_empty_key_from_the_environment(monkeypatch, capsys):
    from tuneforge.cli import main
    from tuneforge.serve import command

    monkeypatch.setattr(command, "load_model", lambda *a, **k: pytest.fail("the model must not load"))
    monkeypatch.setenv(command.API_KEY_VARIABLE, "")
    assert main(["serve"]) == 2
    assert command.API_KEY_VARIABLE in capsys.readouterr().err


def test_error_messages_never_show_the_servers_absolute_paths(served):
    broken = served.adapters_dir / "broken-config"
    broken.mkdir()
    (broken / "adapter_config.json").write_text("{not json")
    answers = [served.http.post("/v1/completions", json=completion("hi", model="missing")),
               served.http.post("/v1/adapters/load", json={"name": "missing"}),
               served.http.post("/v1/adapters/load", json={"name": "broken-config"})]
    assert [a.status_code for a in answers] == [404, 404, 400]
    roots = {str(served.adapters_dir), str(served.adapters_dir.resolve()), str(served.adapters_dir.parent)}
    for answer in answers:
        assert not any(root in answer.text for root in roots), answer.text


def test_a_file_linking_out_of_the_adapter_folder_is_refused(served, tmp_path):
    outside = tmp_path / "elsewhere.safetensors"
    shutil.copy(served.adapters_dir / "alpha" / "adapter_model.safetensors", outside)
    linked = served.adapters_dir / "linked-weights"
    linked.mkdir()
    shutil.copy(served.adapters_dir / "alpha" / "adapter_config.json", linked)
    (linked / "adapter_model.safetensors").symlink_to(outside)
    error = error_of(served.http.post("/v1/adapters/load", json={"name": "linked-weights"}), 400)
    assert "adapter_model.safetensors" in error["message"] and "outside" in error["message"]
    assert str(tmp_path) not in error["message"]
