"""Chat templates: a conversation rendered to text, with the character spans that are trained.

Rendering produces `Rendered(text, trained_spans)`: each span covers one assistant reply *and* the
text that closes the turn (`<|im_end|>`, `<|eot_id|>`, or the EOS token), because a model that is
never trained on the end of its turn never learns to stop. Tokenization later maps the spans to
tokens through the tokenizer's character offsets (see tokenization.py).

`template="auto"` uses the tokenizer's own Jinja chat template, so training sees exactly what
`apply_chat_template` gives at inference. Its assistant spans are found by rendering the
conversation prefix by prefix: the text added by rendering message i, after the prompt for
message i (`add_generation_prompt=True`), is that reply and its closing tokens. Built-in templates:

    chatml  <|im_start|>user\\nHi<|im_end|>\\n<|im_start|>assistant\\n[Hello<|im_end|>]
    llama3  <|begin_of_text|><|start_header_id|>user<|end_header_id|>\\n\\nHi<|eot_id|>
            <|start_header_id|>assistant<|end_header_id|>\\n\\n[Hello<|eot_id|>]
    alpaca  Below is an instruction ... request.\\n\\n### Instruction:\\nHi\\n\\n### Response:\\n[Hello<eos>]
    plain   Hi\\n[Hello<eos>]

([...] marks the trained span; separators after the last turn are left out.) Whatever the
template, each span is made to end with a special token: see `_close_every_turn`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

from tuneforge.data.records import Message, Origin
from tuneforge.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

ALPACA_PREAMBLE = "Below is an instruction that describes a task. Write a response that appropriately completes the request."


@dataclass(frozen=True)
class Rendered:
    text: str
    trained_spans: list[tuple[int, int]]  # [start, end) character offsets, in order


@dataclass(frozen=True)
class TurnStyle:
    """How one message is written: `header` may use {role}; `footer` may use {eos} and, for an
    assistant message, belongs to the trained span; `separator` follows the turn, untrained."""

    header: str = ""
    footer: str = ""
    separator: str = ""


@dataclass(frozen=True)
class BuiltinTemplate:
    name: str
    styles: dict[str, TurnStyle]  # by role; "*" for roles not listed
    prefix: str = ""
    default_system: str | None = None  # added when the conversation has no system message
    trim_content: bool = False
    # True when `prefix` already holds the BOS token, so the tokenizer's own BOS is not added again.
    has_bos: bool = False

    def style(self, role: str) -> TurnStyle:
        return self.styles.get(role, self.styles["*"])


BUILTIN_TEMPLATES: dict[str, BuiltinTemplate] = {
    "chatml": BuiltinTemplate(
        "chatml",
        {"*": TurnStyle("<|im_start|>{role}\n", "<|im_end|>", "\n")},
    ),
    # Meta's Llama 3 template trims message content; doing the same keeps training and
    # inference renderings identical.
    "llama3": BuiltinTemplate(
        "llama3",
        {"*": TurnStyle("<|start_header_id|>{role}<|end_header_id|>\n\n", "<|eot_id|>")},
        prefix="<|begin_of_text|>",
        trim_content=True,
        has_bos=True,
    ),
    # Stanford Alpaca's prompt; the original has no end-of-turn marker, so the EOS token closes
    # each response.
    "alpaca": BuiltinTemplate(
        "alpaca",
        {
            "*": TurnStyle("### Input:\n", "", "\n\n"),
            "system": TurnStyle("", "", "\n\n"),
            "user": TurnStyle("### Instruction:\n", "", "\n\n"),
            "assistant": TurnStyle("### Response:\n", "{eos}", "\n\n"),
        },
        default_system=ALPACA_PREAMBLE,
    ),
    "plain": BuiltinTemplate(
        "plain",
        {"*": TurnStyle("", "", "\n"), "assistant": TurnStyle("", "{eos}", "")},
    ),
}
TEMPLATE_NAMES = ("auto", *BUILTIN_TEMPLATES)


def check_template_name(template: str) -> None:
    # "tokenizer" is what "auto" resolves to when the tokenizer has a template; it is accepted so
    # that resolved names can be passed back in.
    if template not in TEMPLATE_NAMES and template != "tokenizer":
        raise ConfigError(f"Unknown chat template {template!r}; choose one of {list(TEMPLATE_NAMES)} ('auto' uses the tokenizer's own template).")


def resolve_template(template: str, tokenizer) -> str:
    """The template actually used: 'auto' becomes 'tokenizer' when the tokenizer has a chat template,
    else 'chatml' (a warning says so, since the model was then not trained with that format).
    Resolving is idempotent: a resolved name resolves to itself."""
    check_template_name(template)
    has_own_template = bool(getattr(tokenizer, "chat_template", None))
    if template == "tokenizer" and not has_own_template:
        raise ConfigError("template='tokenizer' needs a tokenizer with a chat template; this one has none. Use a built-in template, e.g. 'chatml'.")
    if template != "auto":
        return template
    if has_own_template:
        return "tokenizer"
    logger.warning("template='auto': the tokenizer has no chat template; using the built-in 'chatml'. Set template= explicitly to silence this.")
    return "chatml"


def template_writes_bos(resolved: str) -> bool:
    """Whether the rendered text already holds BOS (the tokenizer's own template writes it when
    the model wants one; llama3 writes <|begin_of_text|>); otherwise the tokenizer's BOS is added."""
    return resolved == "tokenizer" or BUILTIN_TEMPLATES[resolved].has_bos


def render_conversation(messages: Sequence[Message], tokenizer, template: str, origin: Origin | None = None) -> Rendered:
    """Render a full conversation for training; `template` is a resolved name (see resolve_template).

    Every trained span is guaranteed to end with a special token of the tokenizer (see
    `_close_every_turn`)."""
    if template == "tokenizer":
        rendered = _render_with_tokenizer_template(messages, tokenizer, origin)
    else:
        rendered = _render_builtin(BUILTIN_TEMPLATES[template], messages, _eos_text(tokenizer))
    return _close_every_turn(rendered, tokenizer)


def _close_every_turn(rendered: Rendered, tokenizer) -> Rendered:
    """Append the EOS text to each trained span that does not already end with a special token.

    Templates close assistant turns with a marker (`<|im_end|>`, `<|eot_id|>`) that is one special
    token only if the tokenizer has it; a template may also write no marker at all. A reply whose
    span does not end in a special token would teach the model nothing about stopping, so EOS is
    added there. This is done in the text, before tokenizing, because tokenizers split special
    tokens out first: the inserted EOS becomes exactly one token and merges with no neighbour."""
    eos = _eos_text(tokenizer)
    stops = {eos, *getattr(tokenizer, "all_special_tokens", [])}
    text, spans, shift = rendered.text, [], 0
    for start, end in rendered.trained_spans:
        start, end = start + shift, end + shift
        if not any(stop and text.endswith(stop, start, end) for stop in stops):
            text = text[:end] + eos + text[end:]
            end += len(eos)
            shift += len(eos)
        spans.append((start, end))
    return Rendered(text, spans)


def render_prompt(messages: Sequence[Message], tokenizer, template: str = "auto") -> str:
    """The text to feed a model to generate the next assistant reply: the conversation so far,
    rendered exactly as in training (EOS added where training adds it), plus the assistant header.
    Built-in templates leave out the tokenizer's BOS: tokenize the prompt with
    add_special_tokens=True to get it, as training does."""
    resolved = resolve_template(template, tokenizer)
    if resolved == "tokenizer":
        return _tokenizer_template_prompt(messages, tokenizer)
    builtin = BUILTIN_TEMPLATES[resolved]
    history = render_conversation(messages, tokenizer, resolved)
    # Training text has a separator after every turn but the last, so it goes before the header.
    separator = builtin.style(messages[-1].role).separator if messages else ""
    return history.text + separator + builtin.style("assistant").header.format(role="assistant")


def _tokenizer_template_prompt(messages: Sequence[Message], tokenizer) -> str:
    conversation = _as_dicts(messages)
    with_header = _apply_tokenizer_template(tokenizer, conversation, add_generation_prompt=True, origin=None)
    if not any(message.role == "assistant" for message in messages):
        return with_header
    without_header = _apply_tokenizer_template(tokenizer, conversation, add_generation_prompt=False, origin=None)
    history = render_conversation(messages, tokenizer, "tokenizer")
    if history.text == without_header or not with_header.startswith(without_header):
        return with_header
    # EOS was added after earlier replies in training (the template writes no stop token); the
    # prompt must contain it too.
    return history.text + with_header[len(without_header):]


def _eos_text(tokenizer) -> str:
    eos = getattr(tokenizer, "eos_token", None)
    if not eos:
        raise ConfigError("The tokenizer has no eos_token, so models trained with it could not learn to stop. Set tokenizer.eos_token (e.g. to the model's end-of-text token).")
    return eos


def _render_builtin(template: BuiltinTemplate, messages: Sequence[Message], eos: str) -> Rendered:
    if template.default_system is not None and (not messages or messages[0].role != "system"):
        messages = (Message("system", template.default_system), *messages)
    pieces = [template.prefix]
    length = len(template.prefix)
    spans = []
    for index, message in enumerate(messages):
        style = template.style(message.role)
        content = message.content.strip() if template.trim_content else message.content
        header = style.header.format(role=message.role)
        body = content + style.footer.format(eos=eos)
        start = length + len(header)
        if message.role == "assistant":
            spans.append((start, start + len(body)))
        separator = style.separator if index < len(messages) - 1 else ""
        pieces += [header, body, separator]
        length = start + len(body) + len(separator)
    return Rendered("".join(pieces), spans)


def _as_dicts(messages: Sequence[Message]) -> list[dict[str, str]]:
    return [{"role": message.role, "content": message.content} for message in messages]


def _apply_tokenizer_template(tokenizer, conversation: list[dict[str, str]], add_generation_prompt: bool, origin: Origin | None) -> str:
    try:
        return tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=add_generation_prompt)
    except Exception as error:  # Jinja templates raise arbitrary errors (e.g. "roles must alternate")
        where = f" from {origin}" if origin else ""
        raise DataError(
            f"The tokenizer's chat template rejected the conversation{where}: {error}. "
            "Fix the conversation, or use a built-in template (template='chatml')."
        ) from None


def _render_with_tokenizer_template(messages: Sequence[Message], tokenizer, origin: Origin | None) -> Rendered:
    conversation = _as_dicts(messages)
    full = _apply_tokenizer_template(tokenizer, conversation, False, origin)
    spans = []
    search_from = 0
    for index, message in enumerate(messages):
        if message.role != "assistant":
            continue
        span = _span_by_prefix_rendering(tokenizer, conversation, index, full, origin)
        if span is None:
            span = _span_by_search(full, message.content, search_from, tokenizer, origin)
        spans.append(span)
        search_from = span[1]
    return Rendered(full, spans)


def _span_by_prefix_rendering(tokenizer, conversation: list[dict[str, str]], index: int, full: str, origin: Origin | None) -> tuple[int, int] | None:
    """The reply at `index` as the text between the prompt for it and the rendering through it.

    Returns None when the template is not prefix-stable (some templates render earlier turns
    differently once later turns exist), in which case the caller searches for the content."""
    prompt = _apply_tokenizer_template(tokenizer, conversation[:index], True, origin) if index else ""
    through = _apply_tokenizer_template(tokenizer, conversation[: index + 1], False, origin)
    if not (through.startswith(prompt) and full.startswith(through)):
        return None
    # What follows the closing token up to the next turn (usually "\n") is a separator: it is
    # not predicted after the stop token at inference, so it is not trained.
    reply = through[len(prompt):].rstrip()
    if not reply:
        return None
    return len(prompt), len(prompt) + len(reply)


def _span_by_search(full: str, content: str, search_from: int, tokenizer, origin: Origin | None) -> tuple[int, int]:
    start = full.find(content, search_from)
    if start < 0 or not content:
        where = f" from {origin}" if origin else ""
        raise DataError(
            f"Cannot find an assistant reply{where} in the text rendered by the tokenizer's chat template "
            "(the template rewrites it). Use a built-in template instead, e.g. template='chatml'."
        )
    end = start + len(content)
    # Include the special token that closes the turn, if the template writes one right after.
    for closing in sorted(getattr(tokenizer, "all_special_tokens", []), key=len, reverse=True):
        if closing and full.startswith(closing, end):
            end += len(closing)
            break
    return start, end
