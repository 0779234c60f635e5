import pytest


@pytest.fixture(autouse=True)
def _single_thread(one_torch_thread):
    yield
