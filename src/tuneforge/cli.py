"""The ``tuneforge`` command: a thin layer that parses arguments and calls the library.

Any ``TuneforgeError`` is printed as a message (exit code 2), never as a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys

from tuneforge import __version__
from tuneforge.errors import TuneforgeError


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "handler", None):
        parser.print_help()
        return 1
    try:
        return args.handler(args) or 0
    except TuneforgeError as exc:
        from rich.console import Console

        Console(stderr=True).print(f"[bold red]error:[/] {exc}", highlight=False, markup=True)
        return 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tuneforge", description="Efficient finetuning of language models.")
    parser.add_argument("--version", action="version", version=f"tuneforge {__version__}")
    commands = parser.add_subparsers(title="commands", metavar="COMMAND")
    _add_train(commands)
    from tuneforge.demo import add_demo_arguments, run_demo
    from tuneforge.eval.command import add_eval_arguments, run_eval
    from tuneforge.serve.chat import add_chat_arguments, run_chat

    _add_command(commands, "eval", "evaluate a base model and adapters side by side", add_eval_arguments, run_eval)
    _add_command(commands, "chat", "chat with a base model (+ adapter) in the terminal", add_chat_arguments, run_chat)
    from tuneforge.serve.command import add_serve_arguments, run_serve

    _add_command(commands, "serve", "serve a base model and many adapters over an OpenAI-compatible HTTP API",
                 add_serve_arguments, run_serve)
    from tuneforge.merge.command import register_commands as register_merge_commands  # merge, export, compress

    register_merge_commands(commands, _add_command)
    _add_command(commands, "demo", "the main job: finetune smollm2-135m on a bundled task, before/after",
                 add_demo_arguments, run_demo)
    from tuneforge.federated.command import add_federated_arguments, run_federated_command

    _add_command(commands, "federated", "finetune an adapter across Flower clients that keep their data",
                 add_federated_arguments, run_federated_command)
    _add_command(commands, "methods", "list the adapter methods (adapter.method values) and what each does",
                 lambda sub: None, run_methods)
    return parser


def run_methods(args) -> int:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from tuneforge.adapters import list_methods

    table = Table(title="adapter methods (set adapter.method; `tuneforge train --help` lists the lora keys)")
    for column in ("method", "PEFT type", "what it does"):
        table.add_column(column)
    for spec in sorted(list_methods(), key=lambda s: s.name):
        table.add_row(spec.name, spec.config_class.peft_type or "-", escape(spec.description))
    Console(width=160).print(table)
    return 0


def _add_train(commands) -> None:
    from tuneforge.config.schema import describe_keys

    train = commands.add_parser(
        "train", help="finetune a model with an adapter",
        description="Finetune CONFIG.yaml's model on its data. Override any key with dotted key=value pairs, "
                    "e.g. training.lr=1e-4 adapter.r=8 data.train=my.jsonl.",
        epilog="Config keys:\n" + describe_keys(), formatter_class=argparse.RawDescriptionHelpFormatter)
    train.add_argument("config", nargs="?", help="YAML config (see examples/); omitted: all defaults")
    train.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides")
    train.add_argument("--resume", action="store_true", help="continue the run in output_dir from its last checkpoint")
    train.add_argument("--overwrite", action="store_true", help="replace an earlier run in output_dir")
    train.set_defaults(handler=run_train)


def _add_command(commands, name: str, help_text: str, add_arguments, handler) -> None:
    sub = commands.add_parser(name, help=help_text, description=help_text)
    add_arguments(sub)
    sub.set_defaults(handler=handler)


def run_train(args) -> int:
    from tuneforge.config import apply_overrides, load_config_file, parse_train_config
    from tuneforge.train import train
    from tuneforge.train.report import print_summary

    overrides = list(args.overrides)
    config_path = args.config
    if config_path and "=" in config_path and not os.path.exists(config_path):
        overrides.insert(0, config_path)  # `tuneforge train key=value` without a file
        config_path = None
    raw = load_config_file(config_path) if config_path else {}
    config = parse_train_config(apply_overrides(raw, overrides), source=config_path or "command line")
    summary = train(config, resume=args.resume, overwrite=args.overwrite)
    print_summary(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
