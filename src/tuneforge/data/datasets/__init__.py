"""Bundled datasets, usable offline: `chatterbot` dialogues and synthetic tasks with gold answers."""

from tuneforge.data.datasets.arithmetic import build_arithmetic
from tuneforge.data.datasets.chatterbot import build_chatterbot, corpus_languages
from tuneforge.data.datasets.registry import dataset_names, get_dataset, list_datasets, register_dataset
from tuneforge.data.datasets.state_tracking import build_state_tracking

register_dataset("arithmetic", build_arithmetic, "One- and two-step word problems with numbers up to 19; the answer is the number.")
register_dataset("state_tracking", build_state_tracking, "Items moved between boxes; answer which box holds an item ('box N').")
register_dataset("chatterbot", build_chatterbot, "Short multi-turn dialogues from chatterbot-corpus; option language='english', 'spanish', ...")

__all__ = ["corpus_languages", "dataset_names", "get_dataset", "list_datasets", "register_dataset"]
