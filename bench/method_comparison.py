"""Method comparison: every registered adapter method, same model, same task, same step budget.

Each method trains smollm2-135m on the bundled ``state_tracking`` task through the real trainer
(``tuneforge.train.train``) for the same number of steps on the same batches, then is scored on the same
held-out problems (greedy exact match, ``tuneforge.eval.generation``) and eval loss. Every method runs in
its own child process, so its peak memory is its own and a crash costs one row, not the run.

    python bench/method_comparison.py                                  # all methods, 100 steps (hours on CPU)
    python bench/method_comparison.py --methods lora,ia3 --steps 5     # a quick look
    python bench/method_comparison.py --model tiny --steps 2           # smoke test in seconds per method

Writes ``<output-dir>/method_comparison.md`` (table, command, date, machine) and ``method_comparison.png``.
Methods are discovered at run time (``list_methods()``); the per-method settings live in ``METHOD_RUNS``
below, and a registered method without an entry there gets a "skipped" row.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

TASK = "state_tracking"
MAX_SEQ_LEN = 256
BATCH_SIZE = 2  # packed rows of MAX_SEQ_LEN per step, as in the demo
MAX_NEW_TOKENS = 8  # answers are "box N"
BASE_ROW = "base"  # the untrained model: the accuracy every method starts from
RESULT_PREFIX = "RESULT "


# ---------------------------------------------------------------------------------------------
# Per-method settings


@dataclass(frozen=True)
class RunContext:
    """What a method's settings may depend on: the model's depth, its tokenizer and the step budget."""

    num_layers: int
    tokenizer: Any
    steps: int


Setting = Any  # a plain value, or a function of the RunContext


def upper_layers(ctx: RunContext) -> list[int]:
    # Upper half of the decoder: backward stops there, which makes a CPU step much cheaper while the
    # task is still learnt (the demo's choice, docs/benchmarks.md); every layer method gets the same set.
    return list(range(ctx.num_layers // 2, ctx.num_layers))


def top_layer(ctx: RunContext) -> list[int]:
    return [ctx.num_layers - 1]


def upper_layer_count(ctx: RunContext) -> int:
    return ctx.num_layers - ctx.num_layers // 2


def answer_token_ids(ctx: RunContext) -> list[int]:
    """The vocabulary rows the answers are written with ("box 1" .. "box 3"): what trainable tokens learn."""
    ids = ctx.tokenizer(" ".join(f"box {n}" for n in (1, 2, 3)), add_special_tokens=False)["input_ids"]
    return sorted(set(ids))


def adalora_warmup(ctx: RunContext) -> int:
    return ctx.steps // 10


def adalora_final(ctx: RunContext) -> int:
    return ctx.steps // 5


@dataclass(frozen=True)
class MethodRun:
    """One benchmark row: the adapter config (values may be functions of the RunContext) and its learning rate.

    Learning rates are typical values from each method's paper or PEFT's examples, not tuned here.
    """

    adapter: dict[str, Setting]
    lr: float = 1e-3

    @property
    def method(self) -> str:
        return self.adapter["method"]


def _layers(**adapter: Setting) -> dict[str, Setting]:
    """A layer method's config on the shared layer set."""
    return {**adapter, "layers_to_transform": upper_layers}


# Budgets are comparable, not equal: rank 16 for the LoRA family (rank 8 where a method has two
# low-rank maps), each other method at its paper's usual size, all on the same upper layers.
METHOD_RUNS: dict[str, MethodRun] = {
    "lora": MethodRun(_layers(method="lora", r=16, alpha=32)),
    "dora": MethodRun(_layers(method="lora", r=16, alpha=32, use_dora=True)),
    "lora-pissa": MethodRun(_layers(method="lora", r=16, alpha=16, init="pissa", pissa_niter=4), lr=5e-4),
    "lora-olora": MethodRun(_layers(method="lora", r=16, alpha=16, init="olora"), lr=5e-4),
    "lora-corda": MethodRun(_layers(method="lora", r=16, alpha=16, init="corda"), lr=5e-4),
    "lora-ga": MethodRun(_layers(method="lora", r=16, alpha=32, init="lora-ga")),
    "lora-eva": MethodRun(_layers(method="lora", r=16, alpha=32, init="eva")),
    "adalora": MethodRun(_layers(method="adalora", init_r=24, target_r=16, alpha=32,
                                 tinit=adalora_warmup, tfinal=adalora_final)),
    "dylora": MethodRun(_layers(method="dylora", r=16, alpha=32)),
    "sora": MethodRun(_layers(method="sora", r=16, alpha=32)),
    "lora-fa": MethodRun(_layers(method="lora-fa", r=16, alpha=32)),
    "allora": MethodRun(_layers(method="allora", r=16)),
    "hydra": MethodRun(_layers(method="hydra", r=8, alpha=16)),
    "vera": MethodRun(_layers(method="vera", r=256), lr=1e-2),
    "lora-xs": MethodRun(_layers(method="lora-xs", r=32, alpha=32), lr=5e-3),
    "vb-lora": MethodRun(_layers(method="vb-lora", r=4, num_vectors=256, vector_length=64, topk=2), lr=5e-3),
    "road": MethodRun(_layers(method="road", variant="road_1", group_size=64), lr=3e-3),
    "mos": MethodRun(_layers(method="mos", r=16, alpha=32, shards_per_vector=2)),
    "loretta": MethodRun(_layers(method="loretta", tt_rank=4, num_cores=3), lr=5e-3),
    "ia3": MethodRun(_layers(method="ia3"), lr=5e-3),
    "ln-tuning": MethodRun(_layers(method="ln-tuning"), lr=5e-3),
    "bitfit": MethodRun(_layers(method="bitfit"), lr=5e-3),
    "bottleneck-houlsby": MethodRun(_layers(method="bottleneck", placement="houlsby", reduction_factor=16)),
    "bottleneck-parallel": MethodRun(_layers(method="bottleneck", placement="parallel", reduction_factor=16)),
    "shira": MethodRun(_layers(method="shira", density=0.01)),
    "sparse-ft": MethodRun(_layers(method="sparse-ft", target_density=0.01), lr=1e-4),
    "layer-select": MethodRun({"method": "layer-select", "layers": top_layer}, lr=1e-4),
    "trainable-tokens": MethodRun({"method": "trainable-tokens", "token_indices": answer_token_ids}, lr=5e-3),
    "oft": MethodRun(_layers(method="oft", oft_block_size=32)),
    "boft": MethodRun(_layers(method="boft", boft_block_size=4)),
    "hra": MethodRun(_layers(method="hra", r=8)),
    "ether": MethodRun(_layers(method="ether", nb=1), lr=3e-3),
    "mole": MethodRun(_layers(method="mole", num_experts=4, top_k=2, r=8, alpha=16)),
    "prompt-tuning": MethodRun({"method": "prompt-tuning", "num_virtual_tokens": 20, "init": "sample-vocab"}, lr=3e-2),
    "prefix-tuning": MethodRun({"method": "prefix-tuning", "num_virtual_tokens": 20}, lr=1e-2),
    "p-tuning": MethodRun({"method": "p-tuning", "num_virtual_tokens": 20}, lr=3e-3),
    "adaption-prompt": MethodRun({"method": "adaption-prompt", "adapter_len": 10,
                                  "adapter_layers": upper_layer_count}, lr=5e-3),
    "loreft": MethodRun({"method": "loreft", "layers": upper_layers, "r": 4}, lr=5e-3),
    "direft": MethodRun({"method": "direft", "layers": upper_layers, "r": 4}, lr=5e-3),
}


def resolve_adapter(run: MethodRun, ctx: RunContext) -> dict[str, Any]:
    return {key: value(ctx) if callable(value) else value for key, value in run.adapter.items()}


# ---------------------------------------------------------------------------------------------
# Which rows


@dataclass
class Row:
    name: str
    method: str
    status: str  # "ok", "failed" or "skipped"
    trainable_params: int | None = None
    adapter_bytes: int | None = None
    peak_memory_mb: float | None = None
    mean_step_seconds: float | None = None
    exact_match: float | None = None
    eval_loss: float | None = None
    final_train_loss: float | None = None
    wall_seconds: float | None = None
    note: str = ""
    adapter: dict[str, Any] = field(default_factory=dict)
    lr: float | None = None


@dataclass(frozen=True)
class PlannedRow:
    name: str
    method: str
    skip_reason: str = ""  # non-empty: reported, not run


def plan_rows(selected: list[str] | None, registered: list[str]) -> list[PlannedRow]:
    """The base row, then each registered method's rows in registry order (variants after their method)."""
    plan = [PlannedRow(BASE_ROW, "-")]
    for method in registered:
        names = [name for name, run in METHOD_RUNS.items() if run.method == method]
        plan += [PlannedRow(name, method) for name in names] or [PlannedRow(method, method, "skipped: no benchmark config")]
    plan += [PlannedRow(name, run.method, f"skipped: method '{run.method}' is not registered")
             for name, run in METHOD_RUNS.items() if run.method not in registered]
    if selected is None:
        return plan
    known = {row.name for row in plan}
    unknown = [name for name in selected if name not in known and name not in registered]
    if unknown:
        raise SystemExit(f"--methods: unknown {', '.join(unknown)}. Rows: {', '.join(sorted(known))}")
    # Exact names only: `--methods lora` runs the one row, so a quick run stays quick; variants are named.
    return [row for row in plan if row.name in selected]


# ---------------------------------------------------------------------------------------------
# Models


def build_tiny_model_and_tokenizer(seed: int = 0):
    """A 2-layer random Llama and a BPE tokenizer trained on the task's own text, in about a second.

    Every projection width is a multiple of 64, so the same per-method settings (block and group
    sizes, vector lengths) fit both this model and smollm2-135m.
    """
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from tuneforge.data import get_dataset
    from tuneforge.models.special_tokens import configure_generation_stops

    specials = ["<pad>", "<eos>", "<|im_start|>", "<|im_end|>"]
    corpus = [message.content for example in get_dataset(TASK, split="train", size=200) for message in example.messages]
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator(corpus + ["system user assistant"], trainers.BpeTrainer(
        vocab_size=320, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>", pad_token="<pad>",
                                        additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    tokenizer.chat_template = (
        "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
        vocab_size=len(tokenizer), max_position_embeddings=512, tie_word_embeddings=True,
        bos_token_id=None, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    ))
    configure_generation_stops(model.generation_config, tokenizer)
    return model, tokenizer


def load_base(model_name: str, device: str):
    """A fresh base model for this process (each child loads its own copy) and its tokenizer."""
    if model_name == "tiny":
        return build_tiny_model_and_tokenizer()
    from tuneforge.models import load_model

    loaded = load_model(model_name, device=device)
    return loaded.model, loaded.tokenizer


# ---------------------------------------------------------------------------------------------
# One method, in a child process


def measure_row(name: str, options: argparse.Namespace) -> dict[str, Any]:
    """Train, save and score one row; returns the row's measurements (runs in the child process)."""
    import torch

    from tuneforge.data import load_examples
    from tuneforge.eval.generation import score_generation
    from tuneforge.train.strategy import resolve_device

    device = resolve_device(options.device)
    model, tokenizer = load_base(options.model, str(device))
    model.to(device)
    held_out = load_examples(TASK, split="eval").examples[: options.eval_examples]
    result: dict[str, Any] = {}
    if name != BASE_ROW:
        result.update(train_row(name, model, tokenizer, options))
    else:
        result["trainable_params"] = 0
    try:
        result["exact_match"] = score_generation(model, tokenizer, held_out, max_new_tokens=MAX_NEW_TOKENS,
                                                 progress=False).exact_match
    except Exception as error:  # keep the training figures of a method that cannot generate
        result["note"] = f"generation failed: {type(error).__name__}: {error}"
    result["eval_loss"] = held_out_loss(model, tokenizer, options)
    result["peak_memory_mb"] = peak_memory_mb(device, torch)
    return result


def train_config(name: str, adapter: dict[str, Any], lr: float, options: argparse.Namespace, eval_size: int = 0):
    """The trainer's config for one row; ``eval_size=0`` because the benchmark scores every row (base
    included) itself on the same held-out batches, once, after training."""
    from tuneforge.config import parse_train_config

    return parse_train_config({
        "model": options.model, "device": options.device,
        "output_dir": str(Path(options.work_dir) / name),
        "adapter": adapter,
        "data": {"train": TASK, "max_seq_len": MAX_SEQ_LEN, "packing": True, "eval_size": eval_size},
        "training": {"max_steps": options.steps, "batch_size": BATCH_SIZE, "lr": lr, "warmup_steps": 0,
                     "scheduler": "constant", "log_every": 1, "seed": 0},
    }, source=f"benchmark config of '{name}'")


def train_row(name: str, model, tokenizer, options: argparse.Namespace) -> dict[str, Any]:
    from tuneforge.train import train

    run = METHOD_RUNS[name]
    ctx = RunContext(num_layers=model.config.num_hidden_layers, tokenizer=tokenizer, steps=options.steps)
    config = train_config(name, resolve_adapter(run, ctx), run.lr, options)
    stamps: list[float] = []
    summary = train(config, overwrite=True, model_and_tokenizer=(model, tokenizer),
                    on_step=lambda step, loss: stamps.append(time.perf_counter()))
    return {
        "trainable_params": summary.trainable_params,
        "adapter_bytes": (summary.adapter_dir / "adapter_model.safetensors").stat().st_size,
        "mean_step_seconds": mean_step_seconds(stamps),
        "final_train_loss": summary.final_train_loss,
    }


def held_out_loss(model, tokenizer, options: argparse.Namespace) -> float:
    """Mean loss per answer token on the first ``eval_examples`` held-out problems, batched as the trainer does."""
    from tuneforge.eval.loss import evaluate_loss
    from tuneforge.train.data_setup import prepare_data

    config = train_config(BASE_ROW, {"method": "lora"}, 1e-3, options, eval_size=options.eval_examples)
    return evaluate_loss(model, prepare_data(config, tokenizer).eval_batches, config.training.precision)


def mean_step_seconds(stamps: list[float]) -> float | None:
    """Mean time between step ends over steps 2..N: step 1 holds allocator warm-up."""
    if len(stamps) < 2:
        return None
    return (stamps[-1] - stamps[0]) / (len(stamps) - 1)


def peak_memory_mb(device, torch) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def child_main(options: argparse.Namespace) -> int:
    from tuneforge.errors import TuneforgeError

    try:
        result = measure_row(options.child, options)
    except TuneforgeError as error:
        print(f"{type(error).__name__}: {error}", file=sys.stderr)
        return 1
    print(RESULT_PREFIX + json.dumps(result), flush=True)
    return 0


# ---------------------------------------------------------------------------------------------
# The parent: run the children, collect rows


def child_command(name: str, options: argparse.Namespace) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), "--child", name, "--model", options.model,
            "--steps", str(options.steps), "--eval-examples", str(options.eval_examples),
            "--device", options.device, "--work-dir", str(options.work_dir)]


def run_row(planned: PlannedRow, options: argparse.Namespace) -> Row:
    run = METHOD_RUNS.get(planned.name)
    row = Row(planned.name, planned.method, "skipped", note=planned.skip_reason,
              adapter={k: v if not callable(v) else f"<{v.__name__}>" for k, v in run.adapter.items()} if run else {},
              lr=run.lr if run else None)
    if planned.skip_reason:
        return row
    started = time.perf_counter()
    done = subprocess.run(child_command(planned.name, options), capture_output=True, text=True,
                          env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    row.wall_seconds = time.perf_counter() - started
    results = [line for line in done.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if done.returncode != 0 or not results:
        row.status, row.note = "failed", failure_summary(done.returncode, done.stderr)
        log_failure(planned.name, options, done)
        return row
    row.status = "ok"
    for key, value in json.loads(results[-1][len(RESULT_PREFIX):]).items():
        setattr(row, key, value)
    return row


def failure_summary(returncode: int, stderr: str) -> str:
    """The last non-empty stderr line (the exception), or how the process died."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    if returncode < 0:
        return f"child process killed by signal {-returncode}" + (f"; last output: {lines[-1]}" if lines else "")
    return lines[-1] if lines else f"child process exited with code {returncode} and no message"


def log_failure(name: str, options: argparse.Namespace, done: subprocess.CompletedProcess) -> None:
    from tuneforge.fileio import atomic_write_text

    atomic_write_text(Path(options.work_dir) / f"{name}.failed.log", f"stdout:\n{done.stdout}\nstderr:\n{done.stderr}")


def describe(row: Row) -> str:
    if row.status != "ok":
        return f"{row.status}: {row.note}" if row.status == "failed" else row.note
    return (f"acc {fmt_fraction(row.exact_match)}, eval loss {fmt_float(row.eval_loss, 3)}, "
            f"{fmt_int(row.trainable_params)} params, step {fmt_float(row.mean_step_seconds, 2)} s, "
            f"peak {fmt_float(row.peak_memory_mb, 0)} MiB, {row.wall_seconds:.0f} s" + (f"; {row.note}" if row.note else ""))


def run_all(plan: list[PlannedRow], options: argparse.Namespace) -> list[Row]:
    total = len(plan)

    def run_and_report(index_and_row: tuple[int, PlannedRow]) -> Row:
        index, planned = index_and_row
        if not planned.skip_reason:
            print(f"[{index}/{total}] {planned.name}: running ...", flush=True)
        row = run_row(planned, options)
        print(f"[{index}/{total}] {planned.name}: {describe(row)}", flush=True)
        return row

    with ThreadPoolExecutor(max_workers=options.jobs) as pool:
        return list(pool.map(run_and_report, enumerate(plan, start=1)))


# ---------------------------------------------------------------------------------------------
# Report


def fmt_int(value: int | None) -> str:
    return "-" if value is None else f"{value:,}"


def fmt_float(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def fmt_fraction(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def cpu_model() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor() or platform.machine()
    names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    return names[0] if names else platform.machine()


def machine_description(device: str) -> str:
    import torch

    text = f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPU cores ({cpu_model()}), torch {torch.__version__}"
    if device != "cpu" and torch.cuda.is_available():
        text += f", GPU {torch.cuda.get_device_name(0)}"
    return text


def render_markdown(rows: list[Row], options: argparse.Namespace, command: str, date: str) -> str:
    header = ("| method | status | trainable params | adapter file bytes | peak memory (MiB) | mean step (s) | "
              "exact match | eval loss | lr | note |")
    lines = [
        "# Method comparison",
        "",
        f"Every adapter method trained on **{options.model}**, task `{TASK}` (bundled), {options.steps} optimizer "
        f"steps of {BATCH_SIZE} packed rows x {MAX_SEQ_LEN} tokens, constant learning rate, seed 0; scored on the "
        f"first {options.eval_examples} held-out problems: greedy exact match, and eval loss (mean per answer token). Layer methods "
        "adapt the upper half of the decoder layers. Learning rates are per method (typical values, not tuned); the "
        "figures are what one run measured.",
        "",
        f"- command: `{command}`",
        f"- date: {date}",
        f"- machine: {machine_description(options.device)}; device `{options.device}`; {options.jobs} method(s) at a time",
        f"- rows: {len(rows)}" + (" (a subset chosen with --methods)" if options.methods else " (every registered method)"),
        "- peak memory: the method's own child process (max RSS on CPU, which includes the base model and "
        "generation; max allocated on CUDA)",
        "- mean step: wall time between optimizer steps 2..N (step 1 holds warm-up)",
        "",
        header,
        "|" + "---|" * header.count(" | ") + "---|",
    ]
    for row in rows:
        lines.append(
            f"| {row.name} | {row.status} | {fmt_int(row.trainable_params)} | {fmt_int(row.adapter_bytes)} | "
            f"{fmt_float(row.peak_memory_mb, 0)} | {fmt_float(row.mean_step_seconds, 3)} | "
            f"{fmt_fraction(row.exact_match)} | {fmt_float(row.eval_loss, 4)} | "
            f"{'-' if row.lr is None else f'{row.lr:g}'} | {' '.join(row.note.split()).replace('|', '/')} |")
    lines += ["", "## Adapter settings", "", "Functions of the model (`<upper_layers>`: the upper half of the "
              "decoder layers) are resolved per model in `bench/method_comparison.py`.", ""]
    lines += [f"- `{row.name}`: `{json.dumps(row.adapter)}`" for row in rows if row.adapter]
    lines += ["", "![method comparison](method_comparison.png)", ""]
    return "\n".join(lines)


def plot_rows(rows: list[Row], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from tuneforge.fileio import atomic_write

    measured = [row for row in rows if row.status == "ok"]
    trained = [row for row in measured if row.trainable_params and row.exact_match is not None]
    timed = [row for row in measured if row.mean_step_seconds is not None]
    figure, (scatter, bars) = plt.subplots(1, 2, figsize=(14, max(5.0, 0.28 * len(timed) + 1.5)))
    scatter.scatter([row.trainable_params for row in trained], [100 * row.exact_match for row in trained])
    for index, row in enumerate(sorted(trained, key=lambda row: row.trainable_params)):
        # Staggered label heights: neighbours on the log axis often share an accuracy.
        scatter.annotate(row.name, (row.trainable_params, 100 * row.exact_match), fontsize=7,
                         xytext=(3, 3 + 9 * (index % 4)), textcoords="offset points")
    base = next((row for row in measured if row.name == BASE_ROW and row.exact_match is not None), None)
    if base is not None:
        scatter.axhline(100 * base.exact_match, color="grey", linestyle="--", label="base model")
        scatter.legend()
    if trained:
        scatter.set_xscale("log")
    scatter.set_ylim(-3, 103)
    scatter.set_xlabel("trainable parameters (log scale)")
    scatter.set_ylabel("held-out exact match (%)")
    scatter.set_title("accuracy vs trainable parameters")
    bars.barh([row.name for row in timed], [row.mean_step_seconds for row in timed])
    bars.invert_yaxis()
    bars.set_xlabel("mean step time (s)")
    bars.set_title("step time")
    bars.tick_params(axis="y", labelsize=7)
    figure.tight_layout()
    atomic_write(path, lambda tmp: figure.savefig(tmp, format="png", dpi=110))
    plt.close(figure)


def write_report(rows: list[Row], options: argparse.Namespace, command: str) -> tuple[Path, Path]:
    from tuneforge.fileio import atomic_write_json, atomic_write_text

    output_dir = Path(options.output_dir)
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    markdown = atomic_write_text(output_dir / "method_comparison.md", render_markdown(rows, options, command, date))
    figure = output_dir / "method_comparison.png"
    plot_rows(rows, figure)
    atomic_write_json(Path(options.work_dir) / "method_comparison.json", [asdict(row) for row in rows])
    return markdown, figure


# ---------------------------------------------------------------------------------------------
# Command line


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", help="comma-separated row names (default: base + every registered method); "
                                          "e.g. lora,lora-pissa,ia3")
    parser.add_argument("--steps", type=int, default=100, help="optimizer steps per method (same for all)")
    parser.add_argument("--eval-examples", type=int, default=64, help="held-out problems for accuracy and eval loss")
    parser.add_argument("--model", default="smollm2-135m", choices=["smollm2-135m", "tiny"])
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto")
    parser.add_argument("--output-dir", default="docs", help="where method_comparison.md/.png are written")
    parser.add_argument("--work-dir", default="/tmp/tuneforge-method-comparison", help="run directories and logs")
    parser.add_argument("--jobs", type=int, default=1, help="methods run at once (>1 disturbs step times)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    options = parser.parse_args(argv)
    for flag in ("steps", "eval_examples", "jobs"):
        if getattr(options, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(options, flag)}")
    return options


def main(argv: list[str] | None = None) -> list[Row]:
    options = parse_arguments(argv)
    if options.child:
        raise SystemExit(child_main(options))
    from tuneforge.adapters import list_methods
    from tuneforge.train.strategy import resolve_device

    options.device = str(resolve_device(options.device))
    selected = [name.strip() for name in options.methods.split(",") if name.strip()] if options.methods else None
    plan = plan_rows(selected, [spec.name for spec in list_methods()])
    command = "python bench/method_comparison.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    print(f"method comparison: {len(plan)} rows on {options.model}, {options.steps} steps each, device {options.device}",
          flush=True)
    rows = run_all(plan, options)
    markdown, figure = write_report(rows, options, command.strip())
    failed = [row.name for row in rows if row.status == "failed"]
    print(f"wrote {markdown} and {figure}" + (f"; failed: {', '.join(failed)}" if failed else ""), flush=True)
    return rows


if __name__ == "__main__":
    main()
