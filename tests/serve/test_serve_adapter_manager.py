"""The adapter manager: on-demand loading, LRU, pinning, validation, safe names, hot load/unload."""

from __future__ import annotations

import os
import threading

import pytest
from serve_helpers import ADAPTERS, chat_model, reference_tokens, save_all_adapters, save_lora
from tiny_models import tiny_llama

from tuneforge.adapters import LoraConfig, add_adapter, save_adapter
from tuneforge.adapters.model import adapter_names, wrapped_layers
from tuneforge.errors import AdapterError, ConfigError
from tuneforge.serve.adapters import (
    AdapterCapacityError,
    AdapterManager,
    InvalidAdapterNameError,
    UnknownAdapterError,
)
from tuneforge.serve.engine import Engine, GenerationRequest
from tuneforge.serve.sampling import SamplingParams


@pytest.fixture(scope="module")
def adapters_dir(tmp_path_factory, tokenizer):
    return save_all_adapters(tokenizer, tmp_path_factory.mktemp("adapters"))


def test_adapters_load_on_demand_and_the_least_recently_used_idle_one_leaves(tokenizer, adapters_dir):
    model = chat_model(tokenizer)
    manager = AdapterManager(model, adapters_dir, max_loaded_adapters=2)
    assert manager.available() == ["alpha", "beta", "gamma"] and manager.loaded() == []
    for name in ("alpha", "beta"):
        manager.acquire(name)
        manager.release(name)
    manager.acquire("alpha")  # alpha is now the most recently used
    manager.release("alpha")
    manager.acquire("gamma")
    assert sorted(adapter_names(model)) == ["alpha", "gamma"], "beta was the least recently used"
    manager.pin("beta")  # pinning loads beta, evicting alpha (gamma is in use)
    assert sorted(adapter_names(model)) == ["beta", "gamma"]
    with pytest.raises(AdapterCapacityError, match="pinned or in use"):
        manager.acquire("alpha")
    manager.release("gamma")
    manager.acquire("alpha")  # gamma is idle now, so it can go
    assert sorted(adapter_names(model)) == ["alpha", "beta"]
    assert {e["name"]: e["pinned"] for e in manager.loaded()} == {"alpha": False, "beta": True}


def test_unknown_names_and_names_that_could_leave_the_directory(tokenizer, adapters_dir, tmp_path):
    manager = AdapterManager(chat_model(tokenizer), adapters_dir)
    with pytest.raises(UnknownAdapterError, match="available adapters: \\['alpha', 'beta', 'gamma'\\]"):
        manager.acquire("delta")
    with pytest.raises(InvalidAdapterNameError, match="must not contain '..'"):
        manager.acquire("..")
    with pytest.raises(InvalidAdapterNameError, match="not a path"):
        manager.acquire(str(adapters_dir / "alpha"))  # absolute
    for name in ("alpha/../beta", "sub/alpha", "sub\\alpha"):
        with pytest.raises(InvalidAdapterNameError, match="not a path"):
            manager.load(name)
    with pytest.raises(InvalidAdapterNameError, match="letters, digits"):
        manager.acquire("alpha.beta")
    outside = save_lora(tokenizer, tmp_path / "outside", 2, ["q_proj"], seed=3)
    os.symlink(outside, adapters_dir / "escape")
    os.symlink(adapters_dir / "alpha", adapters_dir / "alias")  # a link that stays inside is fine
    try:
        with pytest.raises(InvalidAdapterNameError, match="leads outside the adapters directory"):
            manager.acquire("escape")
        assert "escape" not in manager.available()
        manager.acquire("alias")
        assert "alias" in adapter_names(manager.model)
    finally:
        (adapters_dir / "escape").unlink()
        (adapters_dir / "alias").unlink()
    with pytest.raises(ConfigError, match="is not a directory"):
        AdapterManager(chat_model(tokenizer), tmp_path / "missing")


def test_an_adapter_for_another_base_is_refused_and_nothing_stays_loaded(tokenizer, adapters_dir, tmp_path):
    other = tiny_llama(0, vocab_size=len(tokenizer), hidden_size=64, num_attention_heads=4)
    add_adapter(other, LoraConfig(r=2, target_modules=["q_proj"]), "default")
    save_adapter(other, tmp_path / "wide", "default")
    model = chat_model(tokenizer)
    manager = AdapterManager(model, tmp_path)
    with pytest.raises(AdapterError, match="shape .* different base model"):
        manager.acquire("wide")
    assert not list(wrapped_layers(model)) and adapter_names(model) == [] and manager.loaded() == []

    config_path = tmp_path / "wide" / "adapter_config.json"
    config_path.write_text(config_path.read_text().replace('"q_proj"', '"qq_proj"'))
    with pytest.raises(AdapterError, match="qq_proj.* did you mean .q_proj"):
        manager.acquire("wide")
    assert not list(wrapped_layers(model)) and manager.loaded() == []


def test_hot_load_and_unload_while_requests_run_loses_no_request(tokenizer, adapters_dir):
    names = [name for name, *_ in ADAPTERS] + [None]
    prompts = [tuple(tokenizer(text)["input_ids"]) for text in ("Hello there", "Tom has 3 apples", "Which box?")]
    requests = [GenerationRequest(prompts[i % 3], SamplingParams(max_tokens=6), names[i % 4]) for i in range(24)]

    quiet_model = chat_model(tokenizer)
    quiet = Engine(quiet_model, tokenizer, adapters=AdapterManager(quiet_model, adapters_dir), max_batch_size=4, max_queue=32)
    expected = [r.token_ids for r in quiet.generate(requests)]

    model = chat_model(tokenizer)
    manager = AdapterManager(model, adapters_dir, max_loaded_adapters=2)
    engine = Engine(model, tokenizer, adapters=manager, max_batch_size=4, max_queue=32)
    stop_churn = threading.Event()
    churn_errors = []

    def churn():
        while not stop_churn.is_set():
            for name in ("alpha", "beta", "gamma"):
                try:
                    manager.load(name)
                    manager.unload(name)
                except (AdapterCapacityError, UnknownAdapterError):
                    pass  # both slots busy, or a request's load evicted it first: both are fine
                except Exception as error:  # anything else is a bug
                    churn_errors.append(error)

    engine.start()
    churner = threading.Thread(target=churn)
    churner.start()
    try:
        handles = []
        for request in requests:
            while True:
                try:
                    handles.append(engine.submit(request))
                    break
                except AdapterCapacityError:
                    threading.Event().wait(0.01)  # all slots in use: back off, as a client would on 503
        results = [h.result(timeout=60) for h in handles]
    finally:
        stop_churn.set()
        churner.join()
        engine.stop()
    assert not churn_errors
    assert [r.token_ids for r in results] == expected
    assert all(r.finish_reason in ("stop", "length") for r in results)
    assert all(entry["in_use"] == 0 for entry in manager.loaded())


def test_unloading_an_adapter_in_use_waits_for_its_last_request(tokenizer, adapters_dir):
    model = chat_model(tokenizer)
    manager = AdapterManager(model, adapters_dir)
    manager.acquire("beta")  # as a running request does
    assert manager.unload("beta") == {"name": "beta", "status": "draining", "in_use": 1}
    assert "beta" in adapter_names(model), "a running request's adapter must stay until it finishes"
    manager.release("beta")
    assert "beta" not in adapter_names(model) and manager.loaded() == []
    with pytest.raises(UnknownAdapterError, match="not loaded"):
        manager.unload("beta")


def test_an_adapter_replaced_on_disk_serves_its_new_weights_after_reload(tokenizer, tmp_path):
    save_lora(tokenizer, tmp_path / "swap", 4, ["q_proj", "v_proj"], seed=21)
    save_lora(tokenizer, tmp_path / "keep", 2, ["q_proj"], seed=22)  # keeps the layers wrapped meanwhile
    model = chat_model(tokenizer)
    manager = AdapterManager(model, tmp_path)
    engine = Engine(model, tokenizer, adapters=manager)
    prompt = tuple(tokenizer("Tom has 3 apples")["input_ids"])
    request = GenerationRequest(prompt, SamplingParams(max_tokens=8), "swap")
    manager.load("keep")
    before = engine.generate([request])[0].token_ids
    assert list(before) == reference_tokens(tokenizer, list(prompt), 8, tmp_path / "swap")
    manager.unload("swap")
    save_lora(tokenizer, tmp_path / "swap", 4, ["q_proj", "v_proj"], seed=23)  # new weights, same name
    after = engine.generate([request])[0].token_ids
    assert list(after) == reference_tokens(tokenizer, list(prompt), 8, tmp_path / "swap")
    assert after != before
