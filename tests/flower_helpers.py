"""Helpers of the federated tests: a tiny model on disk, client replies, an opened server round."""

from __future__ import annotations

from pathlib import Path

from tiny_models import save_tiny_chat_model


def saved_tiny_model(tmp_path: Path) -> str:
    """The tiny chat model and tokenizer saved as a local HF directory; its path."""
    return save_tiny_chat_model(tmp_path / "model")


def train_reply(arrays, examples=10):
    """A client's reply to a train message: its arrays and example count."""
    from flwr.app import Message, MetricRecord, RecordDict

    from tuneforge.federated.apps import to_record

    return Message(RecordDict({"arrays": to_record(arrays), "metrics": MetricRecord({"num-examples": examples})}),
                   dst_node_id=1, message_type="train")


def open_round(strategy, server_round: int = 1):
    """Give the strategy the round book-keeping configure_train would have started."""
    strategy.rounds[server_round] = {"down_bytes": {}, "up_bytes": {}, "failures": [], "rejected": [], "clients": {}}
    return strategy
