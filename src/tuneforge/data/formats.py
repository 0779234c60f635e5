"""The record formats tuneforge reads, how each is recognised, and its conversion to `Example`.

| format              | required keys                         | becomes                                  |
|---------------------|---------------------------------------|------------------------------------------|
| `alpaca`            | instruction, output (+ input, system) | [system], user: instruction + input, assistant: output |
| `sharegpt`          | conversations: [{from, value}]        | one message per turn, roles mapped        |
| `messages`          | messages: [{role, content}]           | as given (OpenAI chat format)             |
| `prompt_completion` | prompt, completion                    | user: prompt, assistant: completion       |
| `text`              | text                                  | raw text, every token trained             |

`prompt_completion` becomes a two-turn chat so the chosen template decides how prompt and completion
are joined; `template="plain"` gives the near-raw `prompt\\ncompletion<eos>` used with base models.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from tuneforge.data.records import ROLES, Example, Origin, chat_example
from tuneforge.errors import ConfigError, DataError

# How many readable records detection looks at: enough that one malformed first record does not
# decide the format, few enough to stay instant.
DETECTION_SAMPLE = 8

# ShareGPT exports name speakers inconsistently; these are the spellings seen in common dumps.
SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "model": "assistant",
    "chatgpt": "assistant",
    "bard": "assistant",
    "bing": "assistant",
    "function_call": "assistant",
    "system": "system",
    "tool": "tool",
    "observation": "tool",
    "function_response": "tool",
}


class RecordError(DataError):
    """One record does not have the shape its format needs; the loader adds the file and line."""


@dataclass(frozen=True)
class RecordFormat:
    name: str
    required_keys: tuple[str, ...]
    description: str  # the keys as a user would write them, for error messages
    convert: Callable[[dict[str, Any], Origin], Example]


def _require_string(record: dict[str, Any], key: str, allow_empty: bool = False) -> str:
    if key not in record or record[key] is None:
        raise RecordError(f"missing the field {key!r} (the record has keys {sorted(record)})")
    value = record[key]
    if not isinstance(value, str):
        raise RecordError(f"field {key!r} must be a string, got {type(value).__name__} ({_preview(value)})")
    if not allow_empty and not value.strip():
        raise RecordError(f"field {key!r} is empty")
    return value


def _optional_string(record: dict[str, Any], key: str) -> str:
    value = record.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise RecordError(f"field {key!r} must be a string when present, got {type(value).__name__} ({_preview(value)})")
    return value


def _require_list(record: dict[str, Any], key: str, item_shape: str) -> list[Any]:
    if key not in record or record[key] is None:
        raise RecordError(f"missing the field {key!r} (the record has keys {sorted(record)})")
    value = record[key]
    if isinstance(value, str):
        # CSV cells cannot hold lists; a JSON-encoded list in the cell is the usual workaround.
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise RecordError(f"field {key!r} must be a list of {item_shape}, got a string that is not JSON ({_preview(value)})") from None
    if not isinstance(value, (list, tuple)):
        raise RecordError(f"field {key!r} must be a list of {item_shape}, got {type(value).__name__} ({_preview(value)})")
    if not value:
        raise RecordError(f"field {key!r} is an empty conversation; it needs at least one user and one assistant turn")
    return list(value)


def _preview(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _check_has_assistant_turn(turns: list[tuple[str, str]], key: str) -> None:
    if not any(role == "assistant" for role, _ in turns):
        raise RecordError(f"the conversation in {key!r} has no assistant turn, so there is nothing to train on")
    for index, (role, content) in enumerate(turns):
        if role == "assistant" and not content.strip():
            raise RecordError(f"{key}[{index}] is an assistant turn with empty content")


def _convert_alpaca(record: dict[str, Any], origin: Origin) -> Example:
    instruction = _require_string(record, "instruction")
    extra_input = _optional_string(record, "input")
    output = _require_string(record, "output")
    system = _optional_string(record, "system")
    user = f"{instruction}\n\n{extra_input}" if extra_input.strip() else instruction
    turns = ([("system", system)] if system.strip() else []) + [("user", user), ("assistant", output)]
    return chat_example(turns, origin)


def _message_content(message: dict[str, Any], key: str, index: int, content_key: str) -> str:
    content = message.get(content_key)
    if isinstance(content, list):
        # OpenAI "content parts": only text parts can be trained on here.
        texts = [part.get("text") for part in content if isinstance(part, dict) and part.get("type") == "text"]
        if len(texts) != len(content) or not all(isinstance(text, str) for text in texts):
            raise RecordError(f"{key}[{index}].{content_key} is a list of parts; only {{'type': 'text', 'text': ...}} parts are supported")
        return "".join(texts)
    if not isinstance(content, str):
        got = "missing" if content is None else f"{type(content).__name__} ({_preview(content)})"
        raise RecordError(f"{key}[{index}].{content_key} must be a string, got {got}")
    return content


def _convert_sharegpt(record: dict[str, Any], origin: Origin) -> Example:
    conversation = _require_list(record, "conversations", "{from, value} turns")
    turns = [("system", system)] if (system := _optional_string(record, "system")).strip() else []
    for index, turn in enumerate(conversation):
        if not isinstance(turn, dict):
            raise RecordError(f"conversations[{index}] must be an object with 'from' and 'value', got {type(turn).__name__} ({_preview(turn)})")
        speaker = turn.get("from")
        if speaker not in SHAREGPT_ROLES:
            raise RecordError(f"conversations[{index}].from is {speaker!r}; expected one of {sorted(SHAREGPT_ROLES)}")
        turns.append((SHAREGPT_ROLES[speaker], _message_content(turn, "conversations", index, "value")))
    _check_has_assistant_turn(turns, "conversations")
    return chat_example(turns, origin)


def _convert_messages(record: dict[str, Any], origin: Origin) -> Example:
    conversation = _require_list(record, "messages", "{role, content} messages")
    turns = []
    for index, message in enumerate(conversation):
        if not isinstance(message, dict):
            raise RecordError(f"messages[{index}] must be an object with 'role' and 'content', got {type(message).__name__} ({_preview(message)})")
        role = message.get("role")
        if role not in ROLES:
            hint = " (that is the sharegpt shape: use format='sharegpt' with a 'conversations' key)" if "from" in message else ""
            raise RecordError(f"messages[{index}].role is {role!r}; expected one of {list(ROLES)}{hint}")
        turns.append((role, _message_content(message, "messages", index, "content")))
    _check_has_assistant_turn(turns, "messages")
    return chat_example(turns, origin)


def _convert_prompt_completion(record: dict[str, Any], origin: Origin) -> Example:
    prompt = _require_string(record, "prompt", allow_empty=True)
    completion = _require_string(record, "completion")
    return chat_example([("user", prompt), ("assistant", completion)], origin)


def _convert_text(record: dict[str, Any], origin: Origin) -> Example:
    return Example(text=_require_string(record, "text"), origin=origin)


FORMATS: dict[str, RecordFormat] = {
    spec.name: spec
    for spec in (
        RecordFormat("alpaca", ("instruction", "output"), "instruction, output (optional: input, system)", _convert_alpaca),
        RecordFormat("sharegpt", ("conversations",), "conversations: [{from, value}, ...] (from: human/gpt/system/...)", _convert_sharegpt),
        RecordFormat("messages", ("messages",), "messages: [{role, content}, ...] (role: system/user/assistant/tool)", _convert_messages),
        RecordFormat("prompt_completion", ("prompt", "completion"), "prompt, completion", _convert_prompt_completion),
        RecordFormat("text", ("text",), "text", _convert_text),
    )
}


def formats_help() -> str:
    return "\n".join(f"  {name}: {spec.description}" for name, spec in FORMATS.items())


def check_format_name(name: str) -> RecordFormat:
    if name not in FORMATS:
        raise ConfigError(f"Unknown data format {name!r}. Known formats and the keys each needs:\n{formats_help()}")
    return FORMATS[name]


def detect_format(records: Sequence[Any], source: str) -> RecordFormat:
    """The format whose required keys the first readable records carry.

    Each sampled record votes for every format it satisfies; the format with the most votes wins.
    A tie means the records satisfy two formats at once (e.g. both `text` and `prompt`/`completion`),
    which only the user can settle."""
    sample = [record for record in records if isinstance(record, dict)][:DETECTION_SAMPLE]
    votes = Counter(
        name for record in sample for name, spec in FORMATS.items() if all(key in record for key in spec.required_keys)
    )
    if not votes:
        seen = sorted({key for record in sample for key in record})
        found = f"its first records have the keys {seen}" if sample else "it has no JSON-object records"
        raise DataError(
            f"Cannot detect the data format of {source}: {found}. Known formats and the keys each needs:\n"
            f"{formats_help()}\nRename the fields, or pass format=... explicitly."
        )
    ranked = votes.most_common()
    tied = [name for name, count in ranked if count == ranked[0][1]]
    if len(tied) > 1:
        options = "\n".join(f"  {name}: {FORMATS[name].description}" for name in tied)
        raise DataError(f"The data format of {source} is ambiguous: its records fit several formats:\n{options}\nPass format=... to choose one.")
    return FORMATS[ranked[0][0]]


def convert_record(value: Any, record_format: RecordFormat, origin: Origin) -> Example:
    """Convert one parsed record, raising `RecordError` (without location) if it is malformed."""
    if not isinstance(value, dict):
        raise RecordError(f"expected a JSON object with {record_format.description}, got {type(value).__name__} ({_preview(value)})")
    return record_format.convert(value, origin)
