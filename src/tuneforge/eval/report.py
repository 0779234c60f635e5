"""Base model and adapters side by side: the same examples, the same metrics, one table.

    results = evaluate_models(model, tokenizer, {"base": None, "run-1": "runs/a/adapter"}, examples)
    Console().print(render_table(results))

Every adapter is loaded once onto the one base model under its own name; a row is evaluated by
activating its adapter (`set_active_adapters`) or, for the base row, by disabling all of them
(`disabled_adapters`). The base weights are never reloaded or copied, so an N-row comparison costs
one model in memory, and the base row is exactly the model the adapters were trained on.
"""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from rich.markup import escape
from rich.table import Table
from torch import nn

from tuneforge.adapters import adapter_names, delete_adapter, disabled_adapters, load_adapter, set_active_adapters
from tuneforge.adapters.model import adapter_book
from tuneforge.data import BatchPlan, Example, tokenize_examples
from tuneforge.errors import ConfigError
from tuneforge.eval.generation import DEFAULT_SAMPLES, GenerationScore, PromptFormat, require_gold_answers, score_generation
from tuneforge.eval.loss import evaluate_loss

METRICS = ("loss", "exact_match", "contains")
GENERATION_METRICS = ("exact_match", "contains")


@dataclass(frozen=True)
class Column:
    key: str  # the key in a result dict
    title: str
    percent: bool = False
    lower_is_better: bool = False

    def format(self, value: float) -> str:
        return f"{value:.1%}" if self.percent else f"{value:.4f}"


# In display order; a column is shown when any result has its key.
COLUMNS = (
    Column("loss", "loss", lower_is_better=True),
    Column("perplexity", "perplexity", lower_is_better=True),
    Column("exact_match", "exact match", percent=True),
    Column("contains", "contains", percent=True),
)


def check_metrics(metrics: Sequence[str]) -> tuple[str, ...]:
    metrics = tuple(dict.fromkeys(metrics))  # drop repeats, keep order
    unknown = [metric for metric in metrics if metric not in METRICS]
    if unknown or not metrics:
        raise ConfigError(f"metrics={list(metrics)} must be a non-empty selection of {list(METRICS)}; unknown: {unknown}")
    return metrics


def evaluate_models(
    model: nn.Module,
    tokenizer,
    variants: dict[str, str | Path | None],
    examples: Sequence[Example],
    metrics: Sequence[str] = METRICS,
    *,
    template: str = "auto",
    max_new_tokens: int = 32,
    batch_size: int = 16,
    max_seq_len: int = 1024,
    precision: str = "fp32",
    progress: bool = True,
    num_samples: int = DEFAULT_SAMPLES,
) -> list[dict]:
    """One result dict per variant, in the order given.

    `variants` maps a display name to an adapter directory, or to None for the base model. Each
    result holds `name`, `adapter`, `n`, and per metric: `loss` and `perplexity` (mean loss per
    answer token, over unpacked batches), `exact_match` and `contains` (fractions of greedy replies)
    with `samples` [{question, prompt, prediction, gold}]. The model's adapters and active set are as before
    the call when it returns.
    """
    metrics = check_metrics(metrics)
    if not variants:
        raise ConfigError("evaluate_models got no variants; pass e.g. {'base': None, 'mine': 'path/to/adapter'}")
    examples = list(examples)
    # Resolved once: 'auto' on a tokenizer without a chat template then warns once, not per row.
    template = PromptFormat.for_tokenizer(template, tokenizer).template
    generation_metrics = [metric for metric in metrics if metric in GENERATION_METRICS]
    if generation_metrics:
        require_gold_answers(examples)  # before any adapter is loaded or token generated
    loss_batches = _loss_batches(examples, tokenizer, template, max_seq_len, batch_size) if "loss" in metrics else None
    generation_options = dict(template=template, max_new_tokens=max_new_tokens, batch_size=batch_size,
                              progress=progress, num_samples=num_samples)

    results = []
    with _adapters_loaded(model, variants) as internal_names:
        for display_name, directory in variants.items():
            result = {"name": display_name, "adapter": None if directory is None else str(directory), "n": len(examples)}
            with _activated(model, internal_names.get(display_name)):
                if loss_batches is not None:
                    loss = evaluate_loss(model, loss_batches, precision=precision)
                    result.update(loss=loss, perplexity=_perplexity(loss))
                if generation_metrics:
                    score = score_generation(model, tokenizer, examples, **generation_options)
                    result.update(_score_entries(score, generation_metrics, examples))
            results.append(result)
    return results


def _loss_batches(examples: list[Example], tokenizer, template: str, max_seq_len: int, batch_size: int) -> list[dict]:
    # Unpacked, so each example's loss is exactly its own; collated once and reused by every row.
    tokenized = tokenize_examples(examples, tokenizer, template=template, max_seq_len=max_seq_len)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return list(BatchPlan(tokenized, batch_size, packing=False, seed=0, pad_id=pad_id).batches(0))


def _perplexity(loss: float) -> float:
    return math.exp(loss) if loss < 700 else math.inf  # math.exp overflows past ~709


def _score_entries(score: GenerationScore, metrics: Sequence[str], examples: Sequence[Example]) -> dict:
    # `question` (the last prompt message) is for people; `prompt` is what the model saw, template included.
    samples = [
        {"question": _question(example), "prompt": prompt, "prediction": prediction, "gold": gold}
        for example, (prompt, prediction, gold) in zip(examples, score.samples)
    ]
    return {**{metric: getattr(score, metric) for metric in metrics}, "samples": samples}


def _question(example: Example) -> str:
    prompt = example.prompt_messages
    return prompt[-1].content if prompt else ""


@contextlib.contextmanager
def _adapters_loaded(model: nn.Module, variants: dict[str, str | Path | None]) -> Iterator[dict[str, str]]:
    """Load each distinct adapter directory once; yield display name -> adapter name in the model.

    Afterwards the loaded adapters are deleted and the previously active set restored."""
    previously_active = list(adapter_book(model).active)
    taken = set(adapter_names(model))
    by_directory: dict[Path, str] = {}
    internal: dict[str, str] = {}
    try:
        for display_name, directory in variants.items():
            if directory is None:
                continue
            key = Path(directory).resolve()
            if key not in by_directory:
                name = _free_adapter_name(display_name, taken)
                load_adapter(model, directory, name=name, activate=False)
                taken.add(name)
                by_directory[key] = name
            internal[display_name] = by_directory[key]
        yield internal
    finally:
        for name in by_directory.values():
            delete_adapter(model, name)
        set_active_adapters(model, previously_active)


def _free_adapter_name(display_name: str, taken: set[str]) -> str:
    """An adapter name from the display name, in the characters adapter names allow, not yet used."""
    base = "eval-" + (re.sub(r"[^A-Za-z0-9_-]+", "_", display_name).strip("_") or "adapter")
    name, suffix = base, 2
    while name in taken:
        name, suffix = f"{base}-{suffix}", suffix + 1
    return name


@contextlib.contextmanager
def _activated(model: nn.Module, adapter_name: str | None) -> Iterator[None]:
    """Run with only `adapter_name` active, or with every adapter disabled when it is None."""
    if adapter_name is None:
        with disabled_adapters(model):
            yield
        return
    set_active_adapters(model, [adapter_name])
    yield


# ---------------------------------------------------------------------------------------------
# Presentation


def _shown_columns(results: Sequence[dict]) -> list[Column]:
    return [column for column in COLUMNS if any(column.key in result for result in results)]


def _best_values(results: Sequence[dict], columns: Sequence[Column]) -> dict[str, float]:
    """Per column, the best value among the rows (only worth marking when there are rows to compare)."""
    best = {}
    for column in columns:
        values = [result[column.key] for result in results if column.key in result]
        if len(results) > 1 and values:
            best[column.key] = min(values) if column.lower_is_better else max(values)
    return best


def _row_cells(result: dict, columns: Sequence[Column], best: dict[str, float], emphasize: Callable[[str], str]) -> list[str]:
    cells = []
    for column in columns:
        if column.key not in result:
            cells.append("-")
            continue
        text = column.format(result[column.key])
        cells.append(emphasize(text) if best.get(column.key) == result[column.key] else text)
    return cells


def render_table(results: Sequence[dict], title: str | None = None) -> Table:
    """A rich table, one row per variant; the best value of each metric column in bold."""
    columns = _shown_columns(results)
    best = _best_values(results, columns)
    table = Table(title=title)
    table.add_column("model")
    table.add_column("n", justify="right")
    for column in columns:
        table.add_column(column.title, justify="right")
    for result in results:
        cells = _row_cells(result, columns, best, lambda text: f"[bold]{text}[/bold]")
        # Names are user text: a "[" in them must not be read as rich markup.
        table.add_row(escape(result["name"]), str(result["n"]), *cells)
    return table


def to_markdown(results: Sequence[dict]) -> str:
    """A GitHub-flavoured markdown table of the same numbers as `render_table`; best values in bold."""
    columns = _shown_columns(results)
    best = _best_values(results, columns)
    header = ["model", "n", *(column.title for column in columns)]
    lines = [_markdown_row(header), _markdown_row(["---", "---:", *("---:" for _ in columns)])]
    for result in results:
        cells = _row_cells(result, columns, best, lambda text: f"**{text}**")
        lines.append(_markdown_row([result["name"].replace("|", "\\|"), str(result["n"]), *cells]))
    return "\n".join(lines) + "\n"


def _markdown_row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(cells) + " |"
