"""The ``tuneforge`` command: a thin layer that parses arguments and calls the library.

Any ``TuneforgeError`` is printed as a message (exit code 2), never as a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys

from tuneforge import __version__
from tuneforge.errors import ConfigError, TuneforgeError


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parse_arguments(parser, argv)
    if not getattr(args, "handler", None):
        parser.print_help()
        return 1
    try:
        return args.handler(args) or 0
    except TuneforgeError as exc:
        from rich.console import Console

        Console(stderr=True).print(f"[bold red]error:[/] {exc}", highlight=False, markup=True)
        return 2


def parse_arguments(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> argparse.Namespace:
    """Parse, letting ``key=value`` overrides and options come in any order.

    argparse fills a command's positionals from the first run of them only, so in
    ``tuneforge train cfg.yaml --overwrite training.lr=1e-4`` the override after the option is
    "unrecognized". Such leftover positionals are appended to the command's ``overrides`` in the
    order given (``run_train`` then picks out the config file); an unknown --option is still an error.
    """
    args, leftovers = parser.parse_known_args(argv)
    if leftovers:
        unknown = [item for item in leftovers if item.startswith("-")]
        if unknown or not hasattr(args, "overrides"):
            parser.error(f"unrecognized arguments: {' '.join(unknown or leftovers)}")
        args.overrides = [*args.overrides, *leftovers]
    return args


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
    from tuneforge.train.objectives.onpolicy_pairs import add_pairs_arguments, run_pairs

    _add_command(commands, "pairs", "preference pairs from a policy's own mistakes (gold vs sampled wrong answers, DNO)",
                 add_pairs_arguments, run_pairs)
    from tuneforge.select.command import add_select_arguments, run_select

    _add_command(commands, "select", "pick the training examples that matter (dedup, IFD, diversity, GRAPE, ...)",
                 add_select_arguments, run_select)

    from tuneforge.federated.command import add_federated_arguments, run_federated_command

    _add_command(commands, "federated", "finetune an adapter across Flower clients that keep their data",
                 add_federated_arguments, run_federated_command)
    from tuneforge.continual.command import add_continual_arguments, run_continual_command

    _add_command(commands, "continual", "train a stream of tasks in order; R matrix, BWT, forgetting, FWT",
                 add_continual_arguments, run_continual_command)
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
    train.add_argument("--resume", action="store_true", help="continue the run in output_dir from its last checkpoint "
                       "(refused when data, adapter, model, quantization, batch size, grad_accum, max_steps, epochs "
                       "or seed differ from the saved config)")
    train.add_argument("--resume-anyway", action="store_true", help="--resume without comparing configs")
    train.add_argument("--overwrite", action="store_true", help="replace an earlier run in output_dir (it is moved "
                       "aside once everything has loaded, and deleted after the new run's first checkpoint or end)")
    train.add_argument("--nproc", type=int, default=1, metavar="N", help="train on N processes of this machine "
                       "(elastic launch, as torchrun --standalone; see docs/distributed.md)")
    train.set_defaults(handler=run_train)


def _add_command(commands, name: str, help_text: str, add_arguments, handler) -> None:
    sub = commands.add_parser(name, help=help_text, description=help_text)
    add_arguments(sub)
    sub.set_defaults(handler=handler)


def run_train(args) -> int:
    from tuneforge.config import apply_overrides, load_config_file, parse_train_config
    from tuneforge.train import train
    from tuneforge.train.report import print_summary

    from tuneforge.train.strategy import launched_world_size, shutdown_process_group

    config_path, overrides = split_config_and_overrides([args.config] if args.config else [], args.overrides)
    raw = load_config_file(config_path) if config_path else {}
    config = parse_train_config(apply_overrides(raw, overrides), source=config_path or "command line")
    if args.nproc != 1 and launched_world_size() == 1:
        return _launch_workers(args, config, config_path, overrides)
    try:
        summary = train(config, resume=args.resume, overwrite=args.overwrite, resume_anyway=args.resume_anyway)
    finally:
        shutdown_process_group()
    if int(os.environ.get("RANK", "0")) == 0:
        print_summary(summary)
    return 0


def _launch_workers(args, config, config_path: str | None, overrides: list[str]) -> int:
    from tuneforge.train.launch import launch_local
    from tuneforge.train.strategy import check_distributed

    if args.nproc < 1:
        raise ConfigError(f"--nproc={args.nproc}: give a number of processes of 1 or more")
    check_distributed(config, args.nproc)  # refuse here rather than once per worker
    flags = [flag for flag, on in (("--resume", args.resume), ("--resume-anyway", args.resume_anyway),
                                   ("--overwrite", args.overwrite)) if on]
    return launch_local(args.nproc, [*([config_path] if config_path else []), *overrides, *flags])


def split_config_and_overrides(first: list[str], rest: list[str]) -> tuple[str | None, list[str]]:
    """The config file (the one positional that is not ``key=value``, or an existing path) and the overrides, in order."""
    positionals = [*first, *rest]
    files = [item for item in positionals if "=" not in item or os.path.exists(item)]
    if len(files) > 1:
        raise ConfigError(f"tuneforge train takes one config file, got {len(files)}: {', '.join(files)}. "
                          "Overrides look like key=value (e.g. training.lr=1e-4).")
    return (files[0] if files else None), [item for item in positionals if item not in files]


if __name__ == "__main__":
    sys.exit(main())
