"""`tuneforge select DATA --strategy NAME [--budget 0.3|N] --output selected.jsonl [--report DIR]`.

Everything that can be checked (strategy names, options, budget, the fields a strategy needs, the
embedding package) is checked before the base model is loaded, and the model is loaded only when a
strategy needs it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import yaml

from tuneforge.errors import ConfigError


def add_select_arguments(parser: argparse.ArgumentParser) -> None:
    from tuneforge.select.registry import list_strategies

    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = "strategies:\n" + "\n".join(
        f"  {s.name:<11} {s.description}" + (f"\n{'':<14}options: " + ", ".join(f"{k}={v!r}" for k, v in s.options.items())
                                            if s.options else "") for s in list_strategies())
    parser.add_argument("data", help="a .jsonl/.json/.csv/.parquet file, a folder of them, or a bundled dataset name")
    parser.add_argument("--strategy", required=True, help="a strategy, or several joined by '+' (e.g. dedup+length+diversity)")
    parser.add_argument("--budget", help="examples to keep: a fraction (0.3) or a count (300); optional for dedup and grape")
    parser.add_argument("--output", required=True, help="where to write the kept examples (JSONL, messages format)")
    parser.add_argument("--report", help="folder for the report: selection.csv/.md, scores.png, summary.json")
    parser.add_argument("--option", action="append", default=[], metavar="KEY=VALUE", help="a strategy option (repeatable)")
    parser.add_argument("--model", default="smollm2-135m", help="base model for model-based strategies")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--template", default="auto", help="chat template used to render prompts (as in training)")
    parser.add_argument("--max-seq-len", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=16, help="sequences per scoring batch")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--format", default=None, help="record format when it cannot be detected")
    parser.add_argument("--data-option", action="append", default=[], metavar="KEY=VALUE",
                        help="an option of a bundled dataset, e.g. size=1000 (repeatable)")
    parser.add_argument("--cache-dir", default=None, help="score cache (default ~/.cache/tuneforge/select)")
    parser.add_argument("--no-cache", action="store_true", help="neither read nor write cached scores")


def parse_options(pairs: list[str], flag: str = "--option") -> dict:
    options = {}
    for pair in pairs:
        key, separator, value = pair.partition("=")
        if not separator or not key:
            raise ConfigError(f"{flag} {pair!r} is not KEY=VALUE (e.g. {flag} threshold=0.9)")
        options[key.strip()] = yaml.safe_load(value)
    return options


def run_select(args) -> int:
    from rich.console import Console

    from tuneforge.select import SelectContext, load_pool, plan_selection, run_selection
    from tuneforge.select.report import write_report, write_selected
    from tuneforge.select.scoring.cache import default_cache_dir
    from tuneforge.select.scoring.model import load_scoring_model

    console = Console(stderr=True)
    pool = load_pool(args.data, format=args.format, **parse_options(args.data_option, "--data-option"))
    plan = plan_selection(pool, args.strategy, args.budget, parse_options(args.option))
    cache_dir = None if args.no_cache else Path(args.cache_dir) if args.cache_dir else default_cache_dir()

    def load_scorer():
        console.print(f"loading {args.model} for scoring …")
        return load_scoring_model(args.model, device=args.device, dtype=args.dtype, template=args.template,
                                  batch_size=args.batch_size, max_seq_len=args.max_seq_len, cache_dir=cache_dir)

    result = run_selection(pool, plan, SelectContext(seed=args.seed, load_scorer=load_scorer, device=_device(args.device)))
    write_selected(args.output, result, pool)
    if args.report:
        write_report(args.report, result, pool)
    console.print(f"kept {len(result.selection.kept)} of {len(pool)} examples with {args.strategy} "
                  f"in {result.seconds:.1f} s → {args.output}" + (f"; report in {args.report}" if args.report else ""))
    return 0


def _device(name: str) -> str:
    if name != "auto":
        return name
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"
