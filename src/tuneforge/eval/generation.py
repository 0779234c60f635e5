"""Greedy generation on held-out examples, scored against their gold answers.

    score = score_generation(model, tokenizer, load_examples("arithmetic", split="eval").examples[:50])
    score.exact_match, score.contains   # fractions in [0, 1]

Prompts are rendered exactly as in training (`render_prompt` on the conversation before the final
assistant turn) and batched with *left* padding: every prompt then ends at the last column, so
the first generated token of every row is predicted from its own last prompt token, and the
attention mask keeps padding out of every row's context. Greedy decoding makes the outputs a
function of the model and the prompt alone, so two adapters are compared on equal terms.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from torch import nn

from tuneforge.data import BUILTIN_TEMPLATES, Example, Message, render_prompt, resolve_template
from tuneforge.errors import ConfigError, DataError

DEFAULT_SAMPLES = 3  # (prompt, prediction, gold) triples kept for a reader to eyeball
SHOWN_ORIGINS = 3


@dataclass(frozen=True)
class GenerationScore:
    """Fractions of examples whose prediction matches (`exact_match`) or holds (`contains`) the gold answer."""

    exact_match: float
    contains: float
    n: int
    samples: list[tuple[str, str, str]] = field(default_factory=list)  # (prompt, prediction, gold)


# ---------------------------------------------------------------------------------------------
# Scoring


def normalize_answer(text: str) -> str:
    """Strip, casefold, collapse runs of whitespace, and drop one trailing period ("7." == "7")."""
    text = " ".join(text.split()).casefold()
    if text.endswith("."):
        text = text[:-1].rstrip()
    return text


def exact_match(prediction: str, gold: str) -> bool:
    return normalize_answer(prediction) == normalize_answer(gold)


def contains(prediction: str, gold: str) -> bool:
    """True when the gold answer appears in the prediction as a whole word or number.

    "7" is in "The answer is 7." but not in "17", "7th" or "7.5": the match may not touch a
    letter, digit or underscore, nor a decimal point or thousands comma joining it to more digits.
    """
    gold = normalize_answer(gold)
    if not gold:
        return False
    pattern = rf"(?<!\w)(?<!\d[.,]){re.escape(gold)}(?!\w)(?![.,]\d)"
    return re.search(pattern, normalize_answer(prediction)) is not None


# ---------------------------------------------------------------------------------------------
# Prompts


@dataclass(frozen=True)
class PromptFormat:
    """How conversations become prompt token ids, consistent with how training tokenized them.

    `template` is what to pass to `render_prompt` (resolved once, so a tokenizer without a chat
    template warns once, not per prompt). Training adds the tokenizer's BOS unless the template
    writes it itself (the tokenizer's own template, or llama3), so `add_special_tokens` says the same.
    """

    template: str
    add_special_tokens: bool

    @classmethod
    def for_tokenizer(cls, template: str, tokenizer) -> PromptFormat:
        resolved = resolve_template(template, tokenizer)
        if resolved == "tokenizer":
            return cls(template="auto", add_special_tokens=False)
        return cls(template=resolved, add_special_tokens=not BUILTIN_TEMPLATES[resolved].has_bos)

    def render(self, messages: Sequence[Message], tokenizer) -> str:
        return render_prompt(messages, tokenizer, self.template)

    def encode(self, messages: Sequence[Message], tokenizer) -> list[int]:
        text = self.render(messages, tokenizer)
        return list(tokenizer(text, add_special_tokens=self.add_special_tokens)["input_ids"])

    def end_of_turn(self, tokenizer) -> EndOfTurn:
        """What closes an assistant turn in this format, split into the markers that are one token of
        `tokenizer` (stop ids) and those that are not (stop strings). The chatml fallback's
        `<|im_end|>` is several tokens in a tokenizer that lacks it (Gemma's), so only a stop string
        can end a reply there."""
        if self.template in ("auto", "tokenizer"):
            markers = _template_markers(tokenizer)
        else:
            footer = BUILTIN_TEMPLATES[self.template].style("assistant").footer
            markers = [footer] if footer and "{" not in footer else []  # "{eos}": the eos id stops already
        token_ids, strings = [], []
        for marker in markers:
            ids = tokenizer(marker, add_special_tokens=False)["input_ids"]
            if len(ids) == 1:
                token_ids.append(int(ids[0]))
            else:
                strings.append(marker)
        return EndOfTurn(tuple(token_ids), tuple(strings))


@dataclass(frozen=True)
class EndOfTurn:
    """The end-of-turn marker(s) of a prompt format: as token ids where single tokens, else as text."""

    token_ids: tuple[int, ...] = ()
    strings: tuple[str, ...] = ()


def _template_markers(tokenizer) -> list[str]:
    from tuneforge.models.special_tokens import END_OF_TURN_MARKERS

    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # named templates ("default", "tool_use", ...)
        template = "\n".join(template.values())
    return [marker for marker in END_OF_TURN_MARKERS if template and marker in template]


def cut_at_stop_strings(text: str, stops: Sequence[str]) -> str:
    """`text` up to the first of `stops` (a marker written out as text ends the reply there)."""
    cuts = [text.find(stop) for stop in stops if stop and stop in text]
    return text[:min(cuts)] if cuts else text


def gold_answer(example: Example) -> str:
    """The reply a prediction is scored against: the final assistant turn of the conversation
    (messages, sharegpt, alpaca `output`, prompt_completion `completion`); the model is prompted
    with everything before it (`Example.prompt_messages`). The bundled tasks set `answer` to that
    same turn's content."""
    if example.answer is not None:
        return example.answer
    if not example.is_chat:
        raise ValueError(f"Example from {example.origin} is a text example and has no reply to score")
    return next(message.content for message in reversed(example.messages) if message.role == "assistant")


def require_gold_answers(examples: Sequence[Example]) -> None:
    """Raise a DataError unless every example is a conversation (whose final assistant turn is its gold answer)."""
    if not examples:
        raise DataError("Generation scoring got no examples; check the data source, split and --limit.")
    missing = [example for example in examples if not example.is_chat]
    if missing:
        origins = ", ".join(str(example.origin) for example in missing[:SHOWN_ORIGINS])
        raise DataError(
            f"Generation scoring (exact_match, contains) compares a reply with each example's final assistant turn, "
            f"but {len(missing)} of {len(examples)} examples are plain text with no turns (first: {origins}). "
            "Use a conversation format (messages, sharegpt, alpaca, prompt_completion), or the loss metric "
            "instead (--metrics loss)."
        )


# ---------------------------------------------------------------------------------------------
# Generation


def stop_token_ids(model: nn.Module, tokenizer) -> list[int]:
    """Every id that ends a reply: the model's generation-config eos ids (load_model adds the chat
    template's end-of-turn marker there) and the tokenizer's eos."""
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = [configured] if isinstance(configured, int) else list(configured or [])
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    if not ids:
        raise ConfigError("Neither the model's generation_config nor the tokenizer names an eos token, so generation could not stop; set tokenizer.eos_token.")
    return ids


def padding_id(model: nn.Module, tokenizer, stop_ids: Sequence[int]) -> int:
    """The tokenizer's pad id, else the model's, else the first stop id (padding is masked anyway)."""
    if tokenizer.pad_token_id is not None:
        return tokenizer.pad_token_id
    configured = getattr(getattr(model, "generation_config", None), "pad_token_id", None)
    return configured if configured is not None else stop_ids[0]


def left_pad(id_lists: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), both (B, T): each row right-aligned, padding on the left masked out."""
    length = max(len(ids) for ids in id_lists)
    input_ids = torch.full((len(id_lists), length), pad_id, dtype=torch.long)  # (B, T)
    attention_mask = torch.zeros((len(id_lists), length), dtype=torch.long)  # (B, T)
    for row, ids in enumerate(id_lists):
        if ids:
            input_ids[row, length - len(ids):] = torch.tensor(list(ids), dtype=torch.long)
            attention_mask[row, length - len(ids):] = 1
    return input_ids, attention_mask


def until_stop(ids: Sequence[int], stop_ids: Sequence[int]) -> list[int]:
    """The ids before the first stop id: generate pads finished rows, and the pad id need not be special."""
    stops = set(stop_ids)
    for position, token in enumerate(ids):
        if token in stops:
            return list(ids[:position])
    return list(ids)


@torch.no_grad()
def generate_batch(model: nn.Module, id_lists: Sequence[Sequence[int]], *, pad_id: int, stop_ids: Sequence[int],
                   max_new_tokens: int, stop_strings: Sequence[str] = (), tokenizer=None) -> list[list[int]]:
    """Greedy continuations of a batch of prompts, each cut before its first stop token; with
    `stop_strings` (and the `tokenizer` that finds them), a row also ends once it writes one."""
    input_ids, attention_mask = left_pad(id_lists, pad_id)
    device = next(model.parameters()).device
    string_stops = dict(stop_strings=list(stop_strings), tokenizer=tokenizer) if stop_strings else {}
    output = model.generate(**string_stops,
        input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
        do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=pad_id, eos_token_id=list(stop_ids),
        # A checkpoint's sampling defaults (temperature, top_p) mean nothing under greedy decoding.
        temperature=None, top_p=None, top_k=None,
    )
    continuations = output[:, input_ids.shape[1]:].tolist()  # (B, new tokens): prompts end at one column
    return [until_stop(ids, stop_ids) for ids in continuations]


def generate_answers(model: nn.Module, tokenizer, examples: Sequence[Example], *, template: str = "auto",
                     max_new_tokens: int = 32, batch_size: int = 16, progress: bool = True) -> list[str]:
    """Greedy replies to each example's prompt (its conversation before the final assistant turn),
    decoded without special tokens and trimmed. The model's train/eval mode is restored afterwards."""
    _check_generation_options(max_new_tokens, batch_size)
    prompt_format = PromptFormat.for_tokenizer(template, tokenizer)
    prompts = [prompt_format.encode(example.prompt_messages, tokenizer) for example in examples]
    end_of_turn = prompt_format.end_of_turn(tokenizer)
    stop_ids = list(dict.fromkeys([*stop_token_ids(model, tokenizer), *end_of_turn.token_ids]))
    pad_id = padding_id(model, tokenizer, stop_ids)
    was_training = model.training
    model.eval()
    answers: list[str] = []
    try:
        with _batch_progress(-(-len(prompts) // batch_size), progress) as advance:
            for start in range(0, len(prompts), batch_size):
                batch = prompts[start:start + batch_size]
                for ids in generate_batch(model, batch, pad_id=pad_id, stop_ids=stop_ids, max_new_tokens=max_new_tokens,
                                          stop_strings=end_of_turn.strings, tokenizer=tokenizer):
                    text = tokenizer.decode(ids, skip_special_tokens=True)
                    answers.append(cut_at_stop_strings(text, end_of_turn.strings).strip())
                advance()
    finally:
        model.train(was_training)
    return answers


def score_generation(model: nn.Module, tokenizer, examples: Sequence[Example], *, template: str = "auto",
                     max_new_tokens: int = 32, batch_size: int = 16, progress: bool = True,
                     num_samples: int = DEFAULT_SAMPLES) -> GenerationScore:
    """Generate greedily for every example and score the replies against `example.answer`."""
    require_gold_answers(examples)
    prompt_format = PromptFormat.for_tokenizer(template, tokenizer)
    # The resolved name, so a missing chat template is warned about once, not again in here.
    predictions = generate_answers(model, tokenizer, examples, template=prompt_format.template,
                                   max_new_tokens=max_new_tokens, batch_size=batch_size, progress=progress)
    golds = [gold_answer(example) for example in examples]
    samples = [
        (prompt_format.render(example.prompt_messages, tokenizer), prediction, gold)
        for example, prediction, gold in list(zip(examples, predictions, golds))[:num_samples]
    ]
    return GenerationScore(
        exact_match=_fraction(exact_match(p, g) for p, g in zip(predictions, golds)),
        contains=_fraction(contains(p, g) for p, g in zip(predictions, golds)),
        n=len(examples),
        samples=samples,
    )


def _fraction(hits) -> float:
    hits = list(hits)
    return sum(hits) / len(hits) if hits else 0.0


def _check_generation_options(max_new_tokens: int, batch_size: int) -> None:
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens={max_new_tokens!r} must be a positive integer")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size={batch_size!r} must be a positive integer")


@contextlib.contextmanager
def _batch_progress(num_batches: int, enabled: bool) -> Iterator[Callable[[], None]]:
    """A rich bar over generation batches on a terminal; silent in pipes, CI and tests. Yields `advance`."""
    console = Console(stderr=True)
    bar = Progress(
        TextColumn("[bold]generate"), BarColumn(), MofNCompleteColumn(), TextColumn("batches"), TimeElapsedColumn(),
        console=console, disable=not (enabled and console.is_terminal), transient=True,
    )
    task = bar.add_task("generate", total=num_batches)
    with bar:
        yield lambda: bar.advance(task)
