"""`tuneforge eval`: a base model and its adapters scored side by side on the same examples.

    tuneforge eval --adapter runs/arith/adapter --data arithmetic --limit 100
    tuneforge eval --no-base --adapter a=runs/a/adapter --adapter b=runs/b/adapter --output cmp.json
    tuneforge eval --adapter runs/mine/adapter --data held_out.jsonl   # your own data, any chat format

On a file of conversations (messages, sharegpt, alpaca, prompt_completion) the gold answer of each
record is its final assistant turn, and the model is prompted with everything before it.

Everything cheap is checked (adapter folders, data, metrics) before the model is loaded.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console
from rich.markup import escape

from tuneforge.adapters.peft_format import CONFIG_FILE
from tuneforge.data import TEMPLATE_NAMES, Example, load_examples
from tuneforge.errors import ConfigError
from tuneforge.eval.generation import require_gold_answers
from tuneforge.eval.report import GENERATION_METRICS, METRICS, check_metrics, evaluate_models, render_table
from tuneforge.fileio import atomic_write_json
from tuneforge.models import DTYPE_CHOICES, load_model
from tuneforge.models.placement import parse_device, parse_dtype
from tuneforge.quant.presets import QUANTIZE_CHOICES, quantization_settings

DEFAULT_MODEL = "smollm2-135m"
RUN_ADAPTER_FOLDER = "adapter"  # where `tuneforge train` saves the final adapter inside its run folder
SHOWN_PREDICTION_CHARS = 200


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = "Score a base model and adapters side by side: loss/perplexity and greedy-answer accuracy."
    parser.add_argument("--model", default=DEFAULT_MODEL, help=f"base model: embedded name, local path or hub id (default {DEFAULT_MODEL})")
    parser.add_argument("--adapter", action="append", default=[], metavar="[NAME=]DIR",
                        help="an adapter directory, optionally named for the table; repeat to compare several")
    parser.add_argument("--base", action=argparse.BooleanOptionalAction, default=True,
                        help="include a row for the base model without adapters (default: on)")
    parser.add_argument("--data", default="arithmetic", help="data file, folder, or bundled dataset name (default arithmetic)")
    parser.add_argument("--split", default="eval", help="split of a bundled dataset (default eval)")
    parser.add_argument("--limit", type=int, default=100, metavar="N", help="use the first N examples; 0 = all (default 100)")
    parser.add_argument("--metrics", default=None, metavar="LIST",
                        help=f"comma list of {', '.join(METRICS)} (default: all for conversations, whose final assistant "
                             "turn is the gold answer; loss for plain text)")
    parser.add_argument("--max-new-tokens", type=int, default=32, metavar="N", help="generation length limit (default 32)")
    parser.add_argument("--batch-size", type=int, default=16, metavar="N", help="examples per forward pass (default 16)")
    parser.add_argument("--template", default="auto", choices=TEMPLATE_NAMES, help="chat template (default auto: the tokenizer's)")
    parser.add_argument("--dtype", default="auto", choices=list(DTYPE_CHOICES), help="dtype of the base weights (default auto)")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default auto)")
    parser.add_argument("--quantize", default=None, choices=QUANTIZE_CHOICES,
                        help="load the base quantized (as a QLoRA adapter was trained); float32 compute on CPU")
    parser.add_argument("--samples", type=int, default=3, metavar="N", help="sample predictions to print per row (default 3)")
    parser.add_argument("--output", default=None, metavar="FILE.json", help="also write the results as JSON")


def run_eval(args: argparse.Namespace) -> int:
    console = Console()
    variants = build_variants(args.adapter, include_base=args.base)
    examples = select_examples(args.data, args.split, args.limit)
    metrics = choose_metrics(args.metrics, examples, console)
    _check_positive(max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
    parse_dtype(args.dtype)  # cheap checks before the slow model load
    quantization = quantization_settings(args.quantize, parse_device(args.device))

    loaded = load_model(args.model, dtype=args.dtype, device=args.device, quantization=quantization)
    results = evaluate_models(
        loaded.model, loaded.tokenizer, variants, examples, metrics, template=args.template,
        max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, num_samples=max(args.samples, 0),
    )
    console.print(render_table(results, title=f"{args.model} on {args.data} ({args.split}, {len(examples)} examples)"))
    print_samples(console, results)
    if args.output:
        record = {"model": args.model, "data": args.data, "split": args.split, "limit": args.limit,
                  "metrics": list(metrics), "results": results}
        path = atomic_write_json(args.output, record)
        console.print(f"results written to {escape(str(path))}")
    return 0


def parse_adapter_spec(spec: str) -> tuple[str, str]:
    """`NAME=DIR` -> (NAME, DIR); a bare `DIR` is named after its folder, or after the run folder
    for a training run's `.../NAME/adapter`. A path containing '=' that exists is taken whole."""
    name, separator, directory = spec.partition("=")
    if separator and name and directory and not Path(spec).exists():
        return name, directory
    path = Path(spec)
    if path.name == RUN_ADAPTER_FOLDER and path.parent.name:
        return path.parent.name, spec
    return path.name or spec, spec


def adapter_directory(spec: str, directory: str) -> str:
    """The folder holding adapter_config.json: `directory` itself, or a training run's `adapter/` in it."""
    path = Path(directory)
    if (path / CONFIG_FILE).is_file():
        return directory
    if (path / RUN_ADAPTER_FOLDER / CONFIG_FILE).is_file():
        return str(path / RUN_ADAPTER_FOLDER)
    problem = "does not exist" if not path.exists() else f"holds no {CONFIG_FILE}"
    raise ConfigError(f"--adapter {spec!r}: {directory!r} {problem}. Pass a folder holding {CONFIG_FILE}, or a training run folder (its adapter/ is used).")


def run_template(adapter_dir: str) -> str | None:
    """The chat template the training run that saved `adapter_dir` used (its run folder's resolved
    config.yaml, `data.template`), or None when the adapter did not come from a run folder."""
    import yaml

    config = Path(adapter_dir).parent / "config.yaml"
    if Path(adapter_dir).name != RUN_ADAPTER_FOLDER or not config.is_file():
        return None
    try:
        template = (yaml.safe_load(config.read_text(encoding="utf-8")) or {}).get("data", {}).get("template")
    except (OSError, yaml.YAMLError, AttributeError):
        return None
    return template if template in TEMPLATE_NAMES or template == "tokenizer" else None


def build_variants(adapter_specs: list[str], include_base: bool) -> dict[str, str | None]:
    """Display name -> adapter directory (None for the base model), checked to hold an adapter."""
    variants: dict[str, str | None] = {"base": None} if include_base else {}
    for spec in adapter_specs:
        name, directory = parse_adapter_spec(spec)
        if name in variants:
            raise ConfigError(f"--adapter {spec!r}: the name {name!r} is already used by another row; name them apart with NAME=DIR.")
        variants[name] = adapter_directory(spec, directory)
    if not variants:
        raise ConfigError("Nothing to evaluate: --no-base was given without any --adapter. Add --adapter DIR, or drop --no-base.")
    return variants


def select_examples(data: str, split: str, limit: int) -> list[Example]:
    if limit < 0:
        raise ConfigError(f"--limit {limit} must be 0 (all examples) or a positive count")
    examples = load_examples(data, split=split).examples
    return examples[:limit] if limit else examples


def choose_metrics(metrics_text: str | None, examples: list[Example], console: Console) -> tuple[str, ...]:
    """The --metrics list, or by default every metric the data supports (generation needs conversations)."""
    if metrics_text is not None:
        metrics = check_metrics([item.strip() for item in metrics_text.split(",") if item.strip()])
        if any(metric in GENERATION_METRICS for metric in metrics):
            require_gold_answers(examples)
        return metrics
    if all(example.is_chat for example in examples):
        return METRICS  # each conversation's final assistant turn is its gold answer
    console.print("[dim]The data is plain text with no assistant turns to compare replies with, so only the loss "
                  "is computed (exact_match and contains need conversations).[/dim]")
    return ("loss",)


def print_samples(console: Console, results: list[dict]) -> None:
    """A few predictions per row, so a reader sees *how* a model fails, not only how often."""
    for result in results:
        samples = result.get("samples") or []
        if not samples:
            continue
        console.print(f"\n[bold]{escape(result['name'])}[/bold] sample predictions:")
        for sample in samples:
            question = " ".join(sample["question"].split())[:SHOWN_PREDICTION_CHARS]
            prediction = sample["prediction"][:SHOWN_PREDICTION_CHARS]
            console.print(f"  [dim]{escape(question)}[/dim]\n    predicted {escape(repr(prediction))}, gold {escape(repr(sample['gold']))}")


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if value < 1:
            raise ConfigError(f"--{name.replace('_', '-')} {value} must be a positive integer")
