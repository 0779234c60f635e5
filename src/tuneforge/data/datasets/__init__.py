"""Bundled datasets, usable offline: `chatterbot` dialogues and synthetic tasks with gold answers."""

from tuneforge.data.datasets.arithmetic import build_arithmetic
from tuneforge.data.datasets.chatterbot import build_chatterbot, corpus_languages
from tuneforge.data.datasets.dates import build_date_format
from tuneforge.data.datasets.json_fields import build_json_extraction
from tuneforge.data.datasets.registry import dataset_names, get_dataset, list_datasets, register_dataset
from tuneforge.data.datasets.state_tracking import build_state_tracking
from tuneforge.data.datasets.strings import build_string_reversal
from tuneforge.data.datasets.units import build_unit_conversion

register_dataset("arithmetic", build_arithmetic, "One- and two-step word problems with numbers up to 19; the answer is the number.")
register_dataset("state_tracking", build_state_tracking, "Items moved between boxes; answer which box holds an item ('box N').")
register_dataset("date_format", build_date_format, "Rewrite an ISO date as 'Month D, YYYY' (e.g. 'March 7, 2014').")
register_dataset("unit_conversion", build_unit_conversion, "Convert a whole quantity to a smaller unit (km->m, hours->minutes, ...); the answer is the number.")
register_dataset("string_reversal", build_string_reversal, "Spell a made-up lowercase word backwards.")
register_dataset("json_extraction", build_json_extraction, "Read one field's value out of a small JSON object.")
register_dataset("chatterbot", build_chatterbot, "Short multi-turn dialogues from chatterbot-corpus; option language='english', 'spanish', ...")

__all__ = ["corpus_languages", "dataset_names", "get_dataset", "list_datasets", "register_dataset"]
