"""Shared pieces of the serving tests: a tiny chat model, tiny LoRA adapters on disk, references."""

from __future__ import annotations

import contextlib
import socket
import threading
import time

import torch
import uvicorn
from tiny_models import build_tiny_tokenizer, CHATML_TEMPLATE, perturb_trainable, tiny_llama

from tuneforge.adapters import LoraConfig, add_adapter, load_adapter, merge_and_unload, save_adapter
from tuneforge.eval.generation import stop_token_ids

# (name, rank, target modules, seed): ranks and targets differ so the batched path pads and skips.
ADAPTERS = [
    ("alpha", 2, ["q_proj", "v_proj"], 11),
    ("beta", 4, ["q_proj", "k_proj", "v_proj", "o_proj"], 12),
    ("gamma", 8, ["o_proj", "gate_proj", "down_proj"], 13),
]


def chat_tokenizer():
    return build_tiny_tokenizer(chat_template=CHATML_TEMPLATE)


def chat_model(tokenizer, seed: int = 0):
    """The geometry of tests/tiny_models.tiny_chat_model_and_tokenizer, with initializer_range 0.2 so
    greedy tokens depend visibly on the prompt and on adapter weights."""
    return tiny_llama(seed, vocab_size=len(tokenizer), hidden_size=48, num_attention_heads=4, initializer_range=0.2)


def save_lora(tokenizer, directory, rank: int, targets: list[str], seed: int):
    model = chat_model(tokenizer)
    add_adapter(model, LoraConfig(r=rank, alpha=2 * rank, target_modules=targets), "default")
    perturb_trainable(model, scale=0.4, seed=seed)  # B starts at zero: move it so the adapter matters
    save_adapter(model, directory, "default")
    return directory


def save_all_adapters(tokenizer, root):
    for name, rank, targets, seed in ADAPTERS:
        save_lora(tokenizer, root / name, rank, targets, seed)
    return root


def reference_tokens(tokenizer, prompt_ids, max_tokens: int, adapter_dir=None, base=None) -> list[int]:
    """Greedy tokens of one prompt alone through transformers' generate, the adapter merged. ``base``: a
    model to use instead of a fresh one (a fresh build draws from torch's global generator, which a
    training thread running at the same time also draws from)."""
    model = base if base is not None else chat_model(tokenizer)
    if adapter_dir is not None:
        load_adapter(model, adapter_dir)
        model = merge_and_unload(model)
    stops = stop_token_ids(model, tokenizer)
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=max_tokens, do_sample=False,
                             eos_token_id=stops, pad_token_id=tokenizer.pad_token_id)
    generated = out[0, len(prompt_ids):].tolist()
    end = next((i for i, t in enumerate(generated) if t in stops), len(generated))
    return generated[:end]


@contextlib.contextmanager
def loopback_server(app):
    """Run `app` under uvicorn on a free loopback port in a daemon thread; yields its base URL."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.started, "uvicorn did not start"
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)
