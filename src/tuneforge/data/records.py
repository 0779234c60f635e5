"""The normalised example every data format is converted into, and where each one came from.

Two kinds of example exist: a conversation (`messages`), which chat templates render and mask, and
raw `text` for continued pretraining, where every token is trained. Each example remembers its
origin (file and line, or bundled dataset and index) so that any later error can point back to it.
"""

from __future__ import annotations

from dataclasses import dataclass

# `tool` is kept so tool-use conversations survive conversion; templates render it like any
# non-assistant turn (never trained).
ROLES = ("system", "user", "assistant", "tool")


@dataclass(frozen=True)
class Origin:
    """Where a record came from: `unit` is "line" (jsonl, json, csv), "row" (parquet) or "index"
    (bundled datasets); `number` is 1-based."""

    source: str
    number: int | None = None
    unit: str = "line"

    def __str__(self) -> str:
        if self.number is None:
            return self.source
        if self.unit == "line":
            return f"{self.source}:{self.number}"
        return f"{self.source} {self.unit} {self.number}"


@dataclass(frozen=True)
class Message:
    role: str
    content: str

    def __post_init__(self):
        if self.role not in ROLES:
            raise ValueError(f"Message role {self.role!r} is not one of {list(ROLES)}")
        if not isinstance(self.content, str):
            raise TypeError(f"Message content must be a string, got {type(self.content).__name__}")


@dataclass(frozen=True)
class Example:
    """One training example: either `messages` (chat-like formats) or `text` (pretraining).

    `answer` is the gold answer of tasks with checkable answers (the bundled synthetic datasets),
    used for exact-match scoring; it equals the content of the final assistant message.
    """

    messages: tuple[Message, ...] | None = None
    text: str | None = None
    origin: Origin | None = None
    answer: str | None = None

    def __post_init__(self):
        if (self.messages is None) == (self.text is None):
            raise ValueError("An Example holds exactly one of `messages` or `text`")
        if self.messages is not None and not isinstance(self.messages, tuple):
            object.__setattr__(self, "messages", tuple(self.messages))

    @property
    def is_chat(self) -> bool:
        return self.messages is not None

    @property
    def prompt_messages(self) -> tuple[Message, ...]:
        """The conversation up to (not including) the final assistant turn: what an evaluator
        feeds the model before comparing its reply with `answer`."""
        if self.messages is None:
            raise ValueError(f"Example from {self.origin} is a text example and has no prompt")
        last_assistant = max(i for i, m in enumerate(self.messages) if m.role == "assistant")
        return self.messages[:last_assistant]


def chat_example(turns: list[tuple[str, str]], origin: Origin | None = None, answer: str | None = None) -> Example:
    """Build a chat example from (role, content) pairs, the form every converter produces."""
    return Example(messages=tuple(Message(role, content) for role, content in turns), origin=origin, answer=answer)
