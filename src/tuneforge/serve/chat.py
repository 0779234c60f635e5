"""`tuneforge chat`: talk to a base model (plus an optional adapter) in the terminal.

    tuneforge chat --adapter runs/arith/adapter
    printf 'What is 2+3?\\n' | tuneforge chat      # piped: one answer per input line, exits at EOF

The whole conversation is re-rendered with the chat template for every reply, exactly as training
rendered it. Replies come from the serving engine (`serve/engine.py`), the same one `tuneforge serve`
runs: a worker thread steps the engine while the main thread prints each delta as it arrives, so the
main thread stays free to receive Ctrl-C. Ctrl-C cancels the request, which ends at the engine's
next step; the session continues.
"""

from __future__ import annotations

import argparse
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from torch import nn

from tuneforge.adapters import load_adapter
from tuneforge.adapters.model import adapter_book
from tuneforge.data import TEMPLATE_NAMES, Message
from tuneforge.errors import ConfigError
from tuneforge.eval.command import adapter_directory, run_template
from tuneforge.eval.generation import PromptFormat
from tuneforge.models import DTYPE_CHOICES, load_model
from tuneforge.models.placement import parse_device
from tuneforge.quant.presets import QUANTIZE_CHOICES, quantization_settings
from tuneforge.serve.engine import Engine, GenerationRequest
from tuneforge.serve.sampling import SamplingParams

DEFAULT_MODEL = "smollm2-135m"
ADAPTER_NAME = "chat"
HELP = "Commands: /reset starts a new conversation, /exit (or Ctrl-D) quits, /help shows this. Ctrl-C stops an answer."


def add_chat_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = "Chat with a base model, optionally with an adapter, streaming each reply. " + HELP
    parser.add_argument("--model", default=DEFAULT_MODEL, help=f"base model: embedded name, local path or hub id (default {DEFAULT_MODEL})")
    parser.add_argument("--adapter", default=None, metavar="DIR", help="adapter directory (or a training run folder) to apply to the base model")
    parser.add_argument("--system", default=None, metavar="TEXT", help="system message that opens the conversation")
    parser.add_argument("--max-new-tokens", type=int, default=256, metavar="N", help="longest reply in tokens (default 256)")
    parser.add_argument("--temperature", type=float, default=0.0, metavar="T", help="sampling temperature; 0 = greedy (default 0)")
    parser.add_argument("--template", default="auto", choices=TEMPLATE_NAMES, help="chat template (default auto: the tokenizer's)")
    parser.add_argument("--dtype", default="auto", choices=list(DTYPE_CHOICES), help="dtype of the base weights (default auto)")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default auto)")
    parser.add_argument("--quantize", default=None, choices=QUANTIZE_CHOICES,
                        help="load the base quantized, as a QLoRA adapter was trained (float32 compute on CPU, "
                             "bfloat16 on GPU)")


@dataclass(frozen=True)
class ReplySettings:
    max_new_tokens: int = 256
    temperature: float = 0.0

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ConfigError(f"--max-new-tokens {self.max_new_tokens} must be a positive integer")
        if self.temperature < 0:
            raise ConfigError(f"--temperature {self.temperature} must be >= 0 (0 means greedy decoding)")

    def sampling_params(self, room: int) -> SamplingParams:
        """Greedy at temperature 0; `room` is what the context has left after the prompt."""
        if room < 1:
            raise ConfigError("the conversation fills the model's whole context; type /reset to start a new one")
        return SamplingParams(max_tokens=min(self.max_new_tokens, room), temperature=self.temperature)


@dataclass(frozen=True)
class Reply:
    text: str
    interrupted: bool  # Ctrl-C ended it early
    generated_tokens: int = 0


def stream_reply(engine: Engine, prompt_ids: list[int], settings: ReplySettings,
                 on_text: Callable[[str], None], adapter: str | None = None) -> Reply:
    """Generate a reply to `prompt_ids`, passing each decoded piece to `on_text` as it arrives."""
    params = settings.sampling_params(room=engine.max_model_len - len(prompt_ids))
    handle = engine.submit(GenerationRequest(tuple(prompt_ids), params, adapter))
    failures: list[BaseException] = []

    def drive() -> None:
        try:
            engine.run_until_done(handle)
        except BaseException as error:  # re-raised in the main thread; the handle has failed already
            failures.append(error)

    worker = threading.Thread(target=drive, name="tuneforge-chat-engine", daemon=True)
    worker.start()
    pieces: list[str] = []
    interrupted = False
    try:
        for delta in handle.deltas():
            if delta.text:
                pieces.append(delta.text)
                on_text(delta.text)
    except KeyboardInterrupt:
        interrupted = True
        handle.cancel()
    except Exception:
        if not failures:
            raise
    worker.join()
    if failures:
        raise failures[0]
    return Reply("".join(pieces).strip(), interrupted=interrupted, generated_tokens=len(handle.result().token_ids))


@dataclass
class ChatSession:
    """The conversation so far and how to render it; `respond` adds one user turn and its reply."""

    model: nn.Module
    tokenizer: object
    prompt_format: PromptFormat
    settings: ReplySettings
    system: str | None = None
    history: list[Message] = field(default_factory=list)
    adapter: str | None = None  # default: the model's active adapter, if it has exactly one

    def __post_init__(self):
        if self.adapter is None:
            active = adapter_book(self.model).active
            if len(active) > 1:
                raise ConfigError(f"the model has several active adapters {active}; pass ChatSession(adapter=...)")
            self.adapter = active[0] if active else None
        self.engine = Engine(self.model, self.tokenizer, max_batch_size=1, max_queue=1,
                             template=self.prompt_format.template)
        self.reset()

    def reset(self) -> None:
        self.history = [Message("system", self.system)] if self.system else []

    def respond(self, user_text: str, on_text: Callable[[str], None]) -> Reply:
        self.history.append(Message("user", user_text))
        try:
            prompt_ids = self.prompt_format.encode(self.history, self.tokenizer)
            reply = stream_reply(self.engine, prompt_ids, self.settings, on_text, self.adapter)
        except BaseException:
            self.history.pop()  # a failed turn leaves the conversation as it was
            raise
        # Even a stopped reply is kept: it is what the user saw, and turns must keep alternating.
        self.history.append(Message("assistant", reply.text))
        return reply


def run_chat(args: argparse.Namespace) -> int:
    settings = ReplySettings(max_new_tokens=args.max_new_tokens, temperature=args.temperature)
    adapter = adapter_directory(args.adapter, args.adapter) if args.adapter else None  # checked before the slow load
    quantization = quantization_settings(args.quantize, parse_device(args.device))
    loaded = load_model(args.model, dtype=args.dtype, device=args.device, quantization=quantization)
    if adapter:
        load_adapter(loaded.model, adapter, name=ADAPTER_NAME)
    loaded.model.eval()
    # With --template auto, a run folder's adapter is chatted with in the template its run trained on,
    # so its prompts and its end-of-turn marker are the ones it learned.
    template = (run_template(adapter) if adapter and args.template == "auto" else None) or args.template
    session = ChatSession(loaded.model, loaded.tokenizer, PromptFormat.for_tokenizer(template, loaded.tokenizer),
                          settings, system=args.system)
    interactive = sys.stdin.isatty()
    if interactive:
        with_adapter = f" + {adapter}" if adapter else ""
        print(f"Chatting with {args.model}{with_adapter}. {HELP}", file=sys.stderr)
    return chat_loop(session, interactive)


def chat_loop(session: ChatSession, interactive: bool) -> int:
    """Read a line, answer it, repeat until /exit or end of input; returns the exit code."""
    while True:
        try:
            line = read_user_line(interactive)
        except KeyboardInterrupt:  # Ctrl-C at the prompt (not during an answer) leaves, like Ctrl-D
            print(file=sys.stderr)
            return 0
        if line is None or line.strip() in ("/exit", "/quit"):
            return 0
        text = line.strip()
        if not text:
            continue
        if text == "/reset":
            session.reset()
            _note("(new conversation)")
        elif text == "/help":
            _note(HELP)
        elif text.startswith("/") and " " not in text:
            _note(f"Unknown command {text!r}. {HELP}")
        else:
            answer(session, text, interactive)


def answer(session: ChatSession, text: str, interactive: bool) -> None:
    if interactive:
        sys.stdout.write("assistant> ")
    reply = session.respond(text, on_text=_write_now)
    sys.stdout.write("\n")
    if reply.interrupted:
        _note("(stopped)")
    sys.stdout.flush()


def read_user_line(interactive: bool) -> str | None:
    """The next line the user typed, or None at end of input (Ctrl-D, or the end of piped stdin)."""
    if interactive:
        try:
            return input("you> ")  # input() gives line editing and history on a terminal
        except EOFError:
            print(file=sys.stderr)
            return None
    line = sys.stdin.readline()
    return line.rstrip("\n") if line else None


def _write_now(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def _note(message: str) -> None:
    # Notes go to stderr, so piped stdout holds the answers alone.
    print(message, file=sys.stderr)
