"""The pool a selection picks from: examples read as training reads them, plus GRAPE's candidate responses.

Every strategy sees the same views of an example: its instruction (the prompt turns' text) and its
response (the final assistant turn). Records holding a ``candidates`` list (several responses to one
prompt) form a candidate pool, which only GRAPE reads; there ``examples`` carries the first candidate.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from tuneforge.data import Example, load_examples
from tuneforge.data.records import Origin, chat_example
from tuneforge.data.sources import data_files, read_records
from tuneforge.errors import DataError

CANDIDATES_KEY = "candidates"
PROMPT_KEYS = ("prompt", "instruction")


@dataclass
class Pool:
    examples: list[Example]
    # Per example, the candidate responses to its prompt (GRAPE); None for ordinary data.
    candidates: list[list[str]] | None = None
    source: str = "data"

    def __len__(self) -> int:
        return len(self.examples)

    def subset(self, indices: list[int]) -> "Pool":
        candidates = [self.candidates[i] for i in indices] if self.candidates is not None else None
        return Pool([self.examples[i] for i in indices], candidates, self.source)

    def data_hash(self) -> str:
        """A digest of the examples' content (and candidates): the cache key of model scores."""
        digest = hashlib.sha256()
        for index, example in enumerate(self.examples):
            digest.update(json.dumps(example_record(example), sort_keys=True).encode())
            if self.candidates is not None:
                digest.update(json.dumps(self.candidates[index]).encode())
        return digest.hexdigest()[:16]


def instruction_text(example: Example) -> str:
    """The prompt side of an example as plain text ('' for a raw-text example)."""
    if not example.is_chat:
        return ""
    return "\n".join(message.content for message in example.prompt_messages)


def response_text(example: Example) -> str:
    """The final assistant reply (the whole text of a raw-text example)."""
    if not example.is_chat:
        return example.text or ""
    return example.messages[len(example.prompt_messages)].content


def example_record(example: Example) -> dict:
    """An example as a record of the `messages` (or `text`) format, which `load_examples` reads back."""
    if not example.is_chat:
        return {"text": example.text}
    return {"messages": [{"role": m.role, "content": m.content} for m in example.messages]}


def load_pool(source: str | Path, format: str | None = None, **dataset_options) -> Pool:
    """Read a data file, folder or bundled dataset; files whose records hold ``candidates`` give a candidate pool."""
    path = Path(source)
    if path.exists() and _holds_candidates(path):
        return _load_candidate_pool(path)
    return Pool(load_examples(source, format=format, **dataset_options).examples, source=str(source))


def _holds_candidates(path: Path) -> bool:
    for file in data_files(path):
        for record in read_records(file):
            return record.problem is None and isinstance(record.value, dict) and CANDIDATES_KEY in record.value
    return False


def _load_candidate_pool(path: Path) -> Pool:
    examples, candidates = [], []
    for file in data_files(path):
        for record in read_records(file):
            if record.problem is not None:
                raise DataError(f"{record.origin}: {record.problem}")
            prompt, responses = _candidate_record(record.value, record.origin)
            examples.append(chat_example([("user", prompt), ("assistant", responses[0])], origin=record.origin))
            candidates.append(responses)
    if not examples:
        raise DataError(f"Data source {str(path)!r} has no records")
    return Pool(examples, candidates, source=str(path))


def _candidate_record(value, origin: Origin) -> tuple[str, list[str]]:
    if not isinstance(value, dict):
        raise DataError(f"{origin}: a candidate record must be an object with a prompt and a '{CANDIDATES_KEY}' list")
    prompt_key = next((key for key in PROMPT_KEYS if isinstance(value.get(key), str)), None)
    if prompt_key is None:
        raise DataError(f"{origin}: a candidate record needs the prompt as a string under one of {list(PROMPT_KEYS)}; "
                        f"found keys {sorted(value)}")
    prompt = value[prompt_key] + (f"\n\n{value['input']}" if prompt_key == "instruction" and value.get("input") else "")
    responses = value.get(CANDIDATES_KEY)
    if not isinstance(responses, list) or not responses or not all(isinstance(r, str) and r for r in responses):
        raise DataError(f"{origin}: '{CANDIDATES_KEY}' must be a non-empty list of non-empty strings, found {responses!r:.80}")
    return prompt, responses
