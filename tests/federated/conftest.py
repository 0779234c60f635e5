"""Shared set-up of the federated tests."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def inside_a_flower_run(monkeypatch):
    """Flower stamps every Message with the current run; outside a runtime, pretend to be in run 1."""
    try:
        from flwr.supercore.task_identity import TaskIdentity
    except ImportError:  # flwr missing: the tests that need it skip themselves
        return
    monkeypatch.setattr(TaskIdentity, "_run_id", 1, raising=False)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0, raising=False)
    monkeypatch.setattr(TaskIdentity, "_task_id", 0, raising=False)
