"""The official `openai` client against a real uvicorn server on a loopback port."""

from __future__ import annotations

import socket
import threading
import time

import openai
import pytest
import torch
import uvicorn
from serve_helpers import chat_model, chat_tokenizer, save_all_adapters

from tuneforge.serve.adapters import AdapterManager
from tuneforge.serve.api import create_app
from tuneforge.serve.engine import Engine

BASE = "tiny-base"
KEY = "test-key"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def server_url(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    tokenizer = chat_tokenizer()
    adapters_dir = save_all_adapters(tokenizer, tmp_path_factory.mktemp("adapters"))
    model = chat_model(tokenizer)
    manager = AdapterManager(model, adapters_dir)
    app = create_app(Engine(model, tokenizer, adapters=manager), manager, BASE, api_key=KEY)
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.started, "uvicorn did not start"
    yield f"http://127.0.0.1:{port}/v1"
    server.should_exit = True
    thread.join(30)
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def client(server_url):
    return openai.OpenAI(base_url=server_url, api_key=KEY, max_retries=0, timeout=60)


def test_models_and_completions_through_the_openai_client(client):
    models = client.models.list()
    assert [m.id for m in models.data] == [BASE, "alpha", "beta", "gamma"]
    base = client.completions.create(model=BASE, prompt="Tom has 3 apples", max_tokens=8, temperature=0)
    adapted = client.completions.create(model="gamma", prompt="Tom has 3 apples", max_tokens=8, temperature=0)
    assert base.choices[0].text and adapted.choices[0].text
    assert base.choices[0].text != adapted.choices[0].text
    assert base.usage.completion_tokens >= 1


def test_chat_stream_equals_chat_through_the_openai_client(client):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]
    whole = client.chat.completions.create(model="alpha", messages=messages, max_tokens=10, temperature=0)
    stream = client.chat.completions.create(model="alpha", messages=messages, max_tokens=10, temperature=0, stream=True)
    pieces = [chunk.choices[0].delta.content or "" for chunk in stream]
    assert whole.choices[0].message.content and "".join(pieces) == whole.choices[0].message.content


def test_errors_arrive_as_the_openai_client_exceptions(client, server_url):
    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    assert missing.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=BASE, prompt="x", temperature=-2)
    wrong_key = openai.OpenAI(base_url=server_url, api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong_key.models.list()
