"""Fixtures for the serving tests: tiny models on one thread, one tiny chat tokenizer."""

from __future__ import annotations

import pytest
from serve_helpers import chat_tokenizer


@pytest.fixture(autouse=True)
def _single_thread(one_torch_thread):
    yield


@pytest.fixture(scope="module")
def tokenizer():
    return chat_tokenizer()
