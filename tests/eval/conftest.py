"""Fixtures for the evaluation tests: a tiny ChatML tokenizer and random Llamas sized to it."""

from __future__ import annotations

import pytest
from eval_helpers import ANSWERS, QUESTIONS, make_model, qa_example
from tiny_models import CHATML_TEMPLATE, build_tiny_tokenizer

from tuneforge.models import LoadedModel


@pytest.fixture(autouse=True)
def _single_thread(one_torch_thread):
    yield


@pytest.fixture(scope="session")
def chat_tokenizer():
    return build_tiny_tokenizer(chat_template=CHATML_TEMPLATE)


@pytest.fixture
def chat_model(chat_tokenizer):
    return make_model(chat_tokenizer)


@pytest.fixture
def qa_examples():
    return [qa_example(question, answer) for question, answer in zip(QUESTIONS, ANSWERS)]


@pytest.fixture
def fake_load_model(chat_tokenizer):
    """A stand-in for tuneforge.models.load_model that returns a fresh tiny model and records its calls."""
    calls = []

    def load(name_or_path, *, dtype="auto", device="cpu", quantization=None):
        calls.append((name_or_path, dtype, device))
        model = make_model(chat_tokenizer)
        if quantization is not None:
            from tuneforge.quant import quantize_model

            load.quantized = quantization
            quantize_model(model, **quantization)
        return LoadedModel(model, chat_tokenizer, name_or_path, local_dir=None)

    load.calls = calls
    return load
