"""Method comparison: every registered adapter method, same model, same task, same step budget.

Each method trains smollm2-135m on the bundled ``state_tracking`` task through the real trainer
(``tuneforge.train.train``) for the same number of steps on the same batches, then is scored on the same
held-out problems (greedy exact match, ``tuneforge.eval.generation``) and eval loss. Every method runs in
its own child process, so its peak memory is its own and a crash costs one row, not the run.

    python bench/method_comparison.py --max-minutes 10               # resumable: run again until done
    python bench/method_comparison.py --methods lora,ia3 --steps 5     # a quick look
    python bench/method_comparison.py --model tiny --steps 2           # smoke test in seconds per method
    python bench/method_comparison.py --report-only                    # table and plot from the results so far

Resumable. Each finished row is one JSON line appended (and fsynced) to
``<output-dir>/method_comparison.jsonl``; a rerun skips every row whose settings key already has an "ok"
line, so the full table can be built over several short runs (``--max-minutes``, ``--limit``). The key is
a hash of: the row name, model, task, steps, batch size, sequence length, eval problems, seed, learning
rate, adapter settings, device, ``MEASUREMENT_VERSION`` below, and the content of the method's own
source files (its module, plus the init or DoRA module a LoRA variant uses). So a fixed method reruns,
while a commit that touches only other methods does not rerun it. A change elsewhere (trainer, layer
wrapper) does not change the key: pass ``--rerun`` to measure everything again. Failed rows are retried.

Two passes: every row with seed 0, then (once every row has its seed-0 result) seeds 1..``--seeds``-1 for
the ``--top`` best rows by seed-0 accuracy, LoRA included as the reference. The report gives accuracy,
trainable parameters, stored bytes, peak memory and step time relative to LoRA, and per-row diagnostics
(train loss curve, gradient norm, fraction of trainable entries that were ever updated) so that a row
trailing LoRA can be explained from measurements.

Writes ``<output-dir>/method_comparison.md`` and ``method_comparison.png``, both built from the JSONL only.
Text between ``<!-- notes -->`` and ``<!-- /notes -->`` in an existing report is kept when it is rebuilt.
Methods are discovered at run time (``list_methods()``); the per-method settings live in ``METHOD_RUNS``
below. A registered layer method without an entry gets a row with its config's defaults; a registered
model-level method without one gets a "skipped" row; an entry whose method is not registered is ignored,
with a note.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import hashlib
import json
import math
import os
import platform
import resource
import shlex
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

TASK = "state_tracking"
MAX_SEQ_LEN = 256
BATCH_SIZE = 2  # packed rows of MAX_SEQ_LEN per step, as in the demo
MAX_NEW_TOKENS = 8  # answers are "box N"
BASE_ROW = "base"  # the untrained model: the accuracy every method starts from
REFERENCE_ROW = "lora"  # every other row is reported relative to this one
TRAILING_POINTS = 10.0  # rows this many accuracy points behind the reference get a diagnostics entry
RESULT_PREFIX = "RESULT "
RESULTS_FILE = "method_comparison.jsonl"
# Part of every row's key: bump it when what a row measures (or how) changes, so every row reruns.
MEASUREMENT_VERSION = 2
NOTES_START, NOTES_END = "<!-- notes -->", "<!-- /notes -->"


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

    Learning rates are typical values from each method's paper or PEFT's examples, not tuned here;
    the LoRA family's 1e-3 is the demo's (examples/demo.yaml), at which LoRA converges in 100 steps.
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
    "loretta": MethodRun(_layers(method="loretta", r=8, alpha=16, tt_rank=5, num_cores=4), lr=5e-3),
    "ia3": MethodRun(_layers(method="ia3"), lr=5e-3),
    "ln-tuning": MethodRun(_layers(method="ln-tuning"), lr=5e-3),
    # SmolLM2's linear layers have no biases, so published BitFit (existing biases only) has nothing to
    # train there; this row adds zero-initialised biases, which is not the published variant.
    "bitfit-added-biases": MethodRun(_layers(method="bitfit", add_missing_biases=True), lr=5e-3),
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
    "mixlora": MethodRun(_layers(method="mixlora", target_modules=["mlp"], num_experts=4, top_k=2, r=8,
                                 alpha=16)),
    "prompt-tuning": MethodRun({"method": "prompt-tuning", "num_virtual_tokens": 20, "init": "sample-vocab"}, lr=3e-2),
    "prefix-tuning": MethodRun({"method": "prefix-tuning", "num_virtual_tokens": 20}, lr=1e-2),
    "p-tuning": MethodRun({"method": "p-tuning", "num_virtual_tokens": 20}, lr=3e-3),
    "adaption-prompt": MethodRun({"method": "adaption-prompt", "adapter_len": 10,
                                  "adapter_layers": upper_layer_count}, lr=5e-3),
    "loreft": MethodRun({"method": "loreft", "layers": upper_layers, "r": 4}, lr=5e-3),
    "direft": MethodRun({"method": "direft", "layers": upper_layers, "r": 4}, lr=5e-3),
}


# Registered methods that start from adapters trained elsewhere, so a from-scratch row means nothing.
NOT_TRAINED_FROM_SCRATCH = {
    "mole": "skipped: MoLE learns a gate over already-trained LoRAs (merge/lora_router.py); "
            "the trainable mixture of LoRA experts is the mixlora row",
}


def resolve_adapter(run: MethodRun, ctx: RunContext) -> dict[str, Any]:
    return {key: value(ctx) if callable(value) else value for key, value in run.adapter.items()}


def symbolic_adapter(run: MethodRun | None) -> dict[str, Any]:
    """The adapter settings as written in METHOD_RUNS, functions of the model shown by name."""
    if run is None:
        return {}
    return {key: f"<{value.__name__}>" if callable(value) else value for key, value in run.adapter.items()}


def default_run(method: str) -> MethodRun:
    """A registered layer method without a METHOD_RUNS entry: its config's defaults on the shared layers."""
    return MethodRun(_layers(method=method))


# ---------------------------------------------------------------------------------------------
# Which rows


@dataclass(frozen=True)
class PlannedRow:
    name: str
    method: str
    run: MethodRun | None = None  # None for the base row and skipped rows
    skip_reason: str = ""  # non-empty: reported, not run
    note: str = ""  # said in the table, e.g. that the row uses default settings


def plan_rows(selected: list[str] | None, registered: dict[str, bool]) -> tuple[list[PlannedRow], list[str]]:
    """The base row, then each registered method's rows in registry order (variants after their method).

    ``registered`` maps each registered method name to whether it is a layer method. Returns the rows
    and the notes on METHOD_RUNS entries that were ignored because their method is not registered.
    """
    plan = [PlannedRow(BASE_ROW, "-")]
    for method, is_layer_method in registered.items():
        if method in NOT_TRAINED_FROM_SCRATCH:
            plan.append(PlannedRow(method, method, skip_reason=NOT_TRAINED_FROM_SCRATCH[method]))
            continue
        rows = [PlannedRow(name, method, run) for name, run in METHOD_RUNS.items() if run.method == method]
        if not rows and is_layer_method:
            rows = [PlannedRow(method, method, default_run(method),
                               note="no METHOD_RUNS entry: the config's defaults at lr 1e-3")]
        plan += rows or [PlannedRow(method, method, skip_reason="skipped: no benchmark config")]
    ignored = [f"METHOD_RUNS['{name}'] ignored: method '{run.method}' is not registered"
               for name, run in METHOD_RUNS.items() if run.method not in registered]
    if selected is None:
        return plan, ignored
    known = {row.name for row in plan}
    unknown = [name for name in selected if name not in known]
    if unknown:
        raise SystemExit(f"--methods: unknown {', '.join(unknown)}. Rows: {', '.join(sorted(known))}")
    # Exact names only: `--methods lora` runs the one row, so a quick run stays quick; variants are named.
    return [row for row in plan if row.name in selected], ignored


def registered_methods() -> dict[str, bool]:
    """Registered method name -> whether it is a layer method (has a ``build``), in registry order."""
    from tuneforge.adapters import list_methods

    return {spec.name: spec.build is not None for spec in list_methods()}


def run_for(name: str) -> MethodRun:
    """The settings of row ``name``, as the parent planned them (child processes look them up again)."""
    if name in METHOD_RUNS:
        return METHOD_RUNS[name]
    return default_run(name)


# ---------------------------------------------------------------------------------------------
# Settings keys: what makes two measurements of a row the same measurement


def method_source_files(run: MethodRun) -> list[Path]:
    """The files whose code defines this row's method: its module, and the init or DoRA module it uses."""
    import importlib

    from tuneforge.adapters import get_method

    spec = get_method(run.method)
    modules = [(spec.build or spec.attach).__module__]
    init = run.adapter.get("init")
    if isinstance(init, str):
        modules.append(f"tuneforge.adapters.lora.inits.{init.replace('-', '_')}")
    if run.adapter.get("use_dora"):
        modules.append("tuneforge.adapters.lora.dora")
    files = []
    for name in modules:
        try:
            files.append(Path(importlib.import_module(name).__file__))
        except ImportError:  # an init without a module of its own name (e.g. gaussian): nothing to add
            continue
    return files


def method_source_digest(run: MethodRun | None) -> str:
    if run is None:
        return ""
    digest = hashlib.sha256()
    for path in method_source_files(run):
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def warmup_steps(steps: int) -> int:
    return steps // 20  # the demo's 5 warm-up steps in 100


def row_settings(planned: PlannedRow, options: argparse.Namespace, seed: int) -> dict[str, Any]:
    """Everything a row's measurement depends on that a rerun could change (see the module docstring)."""
    return {
        "row": planned.name, "model": options.model, "task": TASK, "steps": options.steps,
        "batch_size": BATCH_SIZE, "max_seq_len": MAX_SEQ_LEN, "warmup_steps": warmup_steps(options.steps),
        "scheduler": "cosine", "eval_examples": options.eval_examples, "max_new_tokens": MAX_NEW_TOKENS,
        "seed": seed, "device": options.device, "lr": planned.run.lr if planned.run else None,
        "adapter": symbolic_adapter(planned.run), "method_source": method_source_digest(planned.run),
        "measurement_version": MEASUREMENT_VERSION,
    }


def settings_key(settings: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:20]


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
# One row, in a child process


@dataclass
class Row:
    """One measurement: a row at one seed. Written to the results JSONL as it finishes."""

    name: str
    method: str
    status: str  # "ok", "failed" or "skipped"
    seed: int = 0
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
    # Diagnostics, for explaining a row from measurements (see TrainingDiagnostics).
    train_losses: list[float] = field(default_factory=list)
    grad_norms: list[float] = field(default_factory=list)
    updated_fraction: float | None = None
    param_norm_start: float | None = None
    param_norm_end: float | None = None

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Row:
        known = {f.name for f in fields(cls)}
        return cls(**{key: value for key, value in data.items() if key in known})


class TrainingDiagnostics:
    """Measurements taken around the trainer's optimizer steps, without changing what the trainer does.

    - ``grad_norms``: the total gradient norm of the trainable parameters at each step, before clipping
      (the value ``clip_grad_norm_`` computes; measured directly when the run does not clip);
    - ``updated_fraction``: the fraction of trainable entries that ever received a non-zero gradient,
      read from AdamW's second-moment state after the last step (with weight decay 0, exactly the
      entries that moved);
    - ``param_norm_start`` / ``param_norm_end``: the norm of all trainable parameters before the first
      and after the last step.

    Only the trainer's optimizer counts. A method may step an optimizer of its own from a training hook
    (diff pruning's gates), with a clip of its own: the trainer's parameters are those of the run's
    first clip (the loop clips before any hook runs) or, without clipping, of the first optimizer step.
    """

    def __init__(self, steps: int):
        self.steps = steps
        self.steps_seen = 0
        self.grad_norms: list[float] = []
        self.updated_fraction: float | None = None
        self.param_norm_start: float | None = None
        self.param_norm_end: float | None = None
        self._trainer_params: set[int] | None = None

    def _is_trainers(self, parameters) -> bool:
        ids = {id(p) for p in parameters}
        if self._trainer_params is None:
            self._trainer_params = ids
        return not ids.isdisjoint(self._trainer_params)

    @contextlib.contextmanager
    def recording(self):
        import torch
        from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

        clip = torch.nn.utils.clip_grad_norm_

        def clip_and_record(parameters, *args, **kwargs):
            parameters = [parameters] if torch.is_tensor(parameters) else list(parameters)
            total_norm = clip(parameters, *args, **kwargs)
            if self._is_trainers(parameters):
                self.grad_norms.append(float(total_norm))
            return total_norm

        # The trainer looks clip_grad_norm_ up on torch.nn.utils at each step; this child process only
        # trains one row, so swapping it for the run's duration is contained.
        torch.nn.utils.clip_grad_norm_ = clip_and_record
        handles = [register_optimizer_step_pre_hook(self._before_step),
                   register_optimizer_step_post_hook(self._after_step)]
        try:
            yield self
        finally:
            torch.nn.utils.clip_grad_norm_ = clip
            for handle in handles:
                handle.remove()

    @staticmethod
    def _parameters(optimizer) -> list:
        return [p for group in optimizer.param_groups for p in group["params"]]

    @staticmethod
    def _norm(tensors) -> float:
        return math.sqrt(sum(float(t.detach().float().pow(2).sum()) for t in tensors))

    def _before_step(self, optimizer, args, kwargs) -> None:
        parameters = self._parameters(optimizer)
        if not self._is_trainers(parameters):
            return
        self.steps_seen += 1
        if self.steps_seen == 1:
            self.param_norm_start = self._norm(parameters)
        if len(self.grad_norms) < self.steps_seen:  # the run does not clip: measure the norm here
            self.grad_norms.append(self._norm(p.grad for p in parameters if p.grad is not None))

    def _after_step(self, optimizer, args, kwargs) -> None:
        import torch

        parameters = self._parameters(optimizer)
        if self.steps_seen != self.steps or not self._is_trainers(parameters):
            return
        self.param_norm_end = self._norm(parameters)
        second_moments = [optimizer.state.get(p, {}).get("exp_avg_sq") for p in parameters]
        if all(torch.is_tensor(m) for m in second_moments):  # AdamW's own state (8-bit state is not read)
            updated = sum(int((m != 0).sum()) for m in second_moments)
            self.updated_fraction = updated / max(1, sum(p.numel() for p in parameters))


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
        "output_dir": str(Path(options.work_dir) / f"{name}-seed{options.seed}"),
        "adapter": adapter,
        "data": {"train": TASK, "max_seq_len": MAX_SEQ_LEN, "packing": True, "eval_size": eval_size},
        "training": {"max_steps": options.steps, "batch_size": BATCH_SIZE, "lr": lr,
                     "warmup_steps": warmup_steps(options.steps), "scheduler": "cosine", "log_every": 1,
                     "seed": options.seed},
    }, source=f"benchmark config of '{name}'")


def train_row(name: str, model, tokenizer, options: argparse.Namespace) -> dict[str, Any]:
    from tuneforge.train import train

    run = run_for(name)
    ctx = RunContext(num_layers=model.config.num_hidden_layers, tokenizer=tokenizer, steps=options.steps)
    config = train_config(name, resolve_adapter(run, ctx), run.lr, options)
    stamps: list[float] = []
    losses: list[float] = []

    def on_step(step: int, loss: float) -> None:
        stamps.append(time.perf_counter())
        losses.append(loss)

    with TrainingDiagnostics(options.steps).recording() as diagnostics:
        summary = train(config, overwrite=True, model_and_tokenizer=(model, tokenizer), on_step=on_step)
    return {
        "trainable_params": summary.trainable_params,
        "adapter_bytes": (summary.adapter_dir / "adapter_model.safetensors").stat().st_size,
        "mean_step_seconds": mean_step_seconds(stamps),
        "final_train_loss": summary.final_train_loss,
        "train_losses": [round(loss, 5) for loss in losses],
        "grad_norms": [round(norm, 5) for norm in diagnostics.grad_norms],
        "updated_fraction": diagnostics.updated_fraction,
        "param_norm_start": diagnostics.param_norm_start,
        "param_norm_end": diagnostics.param_norm_end,
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
# The results file: one JSON line per finished row


class ResultStore:
    """``method_comparison.jsonl``: append-only, one record per finished row; the latest line of a key wins."""

    def __init__(self, path: Path, read_existing: bool = True):
        self.path = path
        self.records: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()
        if read_existing and path.exists():  # --rerun: earlier lines stay in the file but count for nothing
            self._load()

    def _load(self) -> None:
        for number, line in enumerate(self.path.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                key, row = record["key"], Row.from_json(record["row"])
            except (ValueError, KeyError, TypeError) as error:
                print(f"warning: {self.path} line {number} is not a result record ({type(error).__name__}: "
                      f"{error}); ignored. A run cut off mid-write leaves such a line; it is harmless.",
                      file=sys.stderr, flush=True)
                continue
            self.records[key] = {**record, "row": row}

    def row(self, key: str) -> Row | None:
        record = self.records.get(key)
        return None if record is None else record["row"]

    def done(self, key: str) -> bool:
        row = self.row(key)
        return row is not None and row.status == "ok"

    def append(self, key: str, settings: dict[str, Any], row: Row, machine: str) -> None:
        # The 1-minute load average as the row finished: above the row's own threads (about the core
        # count), something else shared the cores and the step time is not an idle-machine figure.
        record = {"key": key, "settings": settings, "row": asdict(row), "machine": machine,
                  "load_average_1min": round(os.getloadavg()[0], 2),
                  "finished": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
        line = (json.dumps(record, sort_keys=True, default=str) + "\n").encode()
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            descriptor = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                if self._ends_mid_line():  # a line cut off by a crash must not swallow this one
                    line = b"\n" + line
                os.write(descriptor, line)  # one write of one line: no other line interleaves
                os.fsync(descriptor)
            finally:
                os.close(descriptor)
            self.records[key] = {**record, "row": row}

    def _ends_mid_line(self) -> bool:
        with open(self.path, "rb") as handle:
            handle.seek(0, os.SEEK_END)
            if handle.tell() == 0:
                return False
            handle.seek(-1, os.SEEK_END)
            return handle.read(1) != b"\n"

    def finished(self) -> list[dict[str, Any]]:
        return list(self.records.values())


# ---------------------------------------------------------------------------------------------
# The parent: run the children, collect rows


def child_command(name: str, options: argparse.Namespace, seed: int) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), "--child", name, "--model", options.model,
            "--steps", str(options.steps), "--eval-examples", str(options.eval_examples),
            "--device", options.device, "--work-dir", str(options.work_dir), "--seed", str(seed)]


def skipped_row(planned: PlannedRow) -> Row:
    return Row(planned.name, planned.method, "skipped", note=planned.skip_reason,
               adapter=symbolic_adapter(planned.run), lr=planned.run.lr if planned.run else None)


def run_row(planned: PlannedRow, options: argparse.Namespace, seed: int) -> Row:
    row = Row(planned.name, planned.method, "failed", seed=seed, adapter=symbolic_adapter(planned.run),
              lr=planned.run.lr if planned.run else None)
    started = time.perf_counter()
    done = subprocess.run(child_command(planned.name, options, seed), capture_output=True, text=True,
                          env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    row.wall_seconds = time.perf_counter() - started
    results = [line for line in done.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if done.returncode != 0 or not results:
        row.note = failure_summary(done.returncode, done.stderr)
        log_failure(f"{planned.name}-seed{seed}", options, done)
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
        return f"{row.status}: {row.note}"
    return (f"acc {fmt_fraction(row.exact_match)}, eval loss {fmt_float(row.eval_loss, 3)}, "
            f"{fmt_int(row.trainable_params)} params, step {fmt_float(row.mean_step_seconds, 2)} s, "
            f"peak {fmt_float(row.peak_memory_mb, 0)} MiB, {row.wall_seconds:.0f} s" + (f"; {row.note}" if row.note else ""))


class Budget:
    """When to stop starting rows: ``--max-minutes`` since the start, ``--limit`` rows run by this invocation."""

    def __init__(self, options: argparse.Namespace):
        self.deadline = None if options.max_minutes is None else time.monotonic() + 60 * options.max_minutes
        self.left = options.limit
        self._lock = threading.Lock()

    def take(self) -> bool:
        with self._lock:
            if self.deadline is not None and time.monotonic() >= self.deadline:
                return False
            if self.left is not None:
                if self.left <= 0:
                    return False
                self.left -= 1
            return True


@dataclass(frozen=True)
class Job:
    planned: PlannedRow
    seed: int
    key: str
    settings: dict[str, Any]


def pending_jobs(plan: list[PlannedRow], seeds: list[int], options: argparse.Namespace,
                 store: ResultStore) -> list[Job]:
    """The (row, seed) measurements of ``plan`` that the results file has no "ok" line for."""
    jobs = []
    for planned in plan:
        if planned.skip_reason:
            continue
        for seed in seeds:
            settings = row_settings(planned, options, seed)
            key = settings_key(settings)
            if not store.done(key):
                jobs.append(Job(planned, seed, key, settings))
    return jobs


def run_jobs(jobs: list[Job], options: argparse.Namespace, store: ResultStore, budget: Budget,
             machine: str, label: str) -> int:
    """Run ``jobs`` (``--jobs`` at a time) while the budget allows; each result is appended as it ends."""
    total = len(jobs)

    def run_one(index_and_job: tuple[int, Job]) -> bool:
        index, job = index_and_job
        if not budget.take():
            return False
        tag = f"[{label} {index}/{total}] {job.planned.name} seed {job.seed}"
        print(f"{tag}: running ...", flush=True)
        row = run_row(job.planned, options, job.seed)
        store.append(job.key, job.settings, row, machine)
        print(f"{tag}: {describe(row)}", flush=True)
        return True

    with ThreadPoolExecutor(max_workers=options.jobs) as pool:
        return sum(pool.map(run_one, enumerate(jobs, start=1)))


def top_rows(plan: list[PlannedRow], options: argparse.Namespace, store: ResultStore, count: int) -> list[PlannedRow] | None:
    """The ``count`` best rows by seed-0 accuracy (then eval loss), plus the reference row; None while
    some row still has no seed-0 result (the ranking is not known yet)."""
    scored = []
    for planned in plan:
        if planned.skip_reason or planned.name == BASE_ROW:
            continue
        row = store.row(settings_key(row_settings(planned, options, 0)))
        if row is None:
            return None
        if row.status == "ok" and row.exact_match is not None:
            scored.append((-row.exact_match, row.eval_loss if row.eval_loss is not None else math.inf, planned))
    best = [planned for *_, planned in sorted(scored, key=lambda item: item[:2])[:count]]
    reference = [planned for planned in plan if planned.name == REFERENCE_ROW and planned not in best]
    return best + reference


def run_comparison(plan: list[PlannedRow], options: argparse.Namespace, store: ResultStore) -> None:
    """Pass 1: every row at seed 0. Pass 2: the other seeds for the top rows, once pass 1 is complete."""
    budget = Budget(options)
    machine = machine_description(options.device)
    first = pending_jobs(plan, [0], options, store)
    print(f"pass 1 (seed 0): {len(first)} of {sum(not p.skip_reason for p in plan)} rows to run", flush=True)
    run_jobs(first, options, store, budget, machine, "seed 0")
    if options.seeds < 2:
        return
    top = top_rows(plan, options, store, options.top)
    if top is None:
        print("pass 2 waits: some rows have no seed-0 result yet (run again to continue)", flush=True)
        return
    second = pending_jobs([p for p in top if p.name != BASE_ROW], list(range(1, options.seeds)), options, store)
    print(f"pass 2 (seeds 1..{options.seeds - 1}, top {options.top} + {REFERENCE_ROW}): {len(second)} runs", flush=True)
    run_jobs(second, options, store, budget, machine, "more seeds")


# ---------------------------------------------------------------------------------------------
# Report: built from the results file alone


@dataclass
class Summary:
    """A planned row across its seeds, as the results file has it."""

    planned: PlannedRow
    runs: list[Row] = field(default_factory=list)  # the "ok" measurements, in seed order
    failure: Row | None = None  # the latest failed attempt, when no seed succeeded

    @property
    def name(self) -> str:
        return self.planned.name

    @property
    def status(self) -> str:
        if self.planned.skip_reason:
            return "skipped"
        return "ok" if self.runs else "failed" if self.failure else "pending"

    def mean(self, attribute: str) -> float | None:
        values = [getattr(run, attribute) for run in self.runs if getattr(run, attribute) is not None]
        return sum(values) / len(values) if values else None

    def first(self, attribute: str):
        return getattr(self.runs[0], attribute) if self.runs else None

    def note(self) -> str:
        parts = [self.planned.skip_reason or self.planned.note]
        if self.failure is not None and not self.runs:
            parts.append(self.failure.note)
        parts += [run.note for run in self.runs[:1]]
        return "; ".join(part for part in parts if part)


def summarize(plan: list[PlannedRow], options: argparse.Namespace, store: ResultStore) -> list[Summary]:
    summaries = []
    for planned in plan:
        summary = Summary(planned)
        if not planned.skip_reason:
            for seed in range(1 if planned.name == BASE_ROW else options.seeds):
                row = store.row(settings_key(row_settings(planned, options, seed)))
                if row is not None and row.status == "ok":
                    summary.runs.append(row)
                elif row is not None:
                    summary.failure = row
        summaries.append(summary)
    return summaries


def fmt_int(value: int | None) -> str:
    return "-" if value is None else f"{value:,}"


def fmt_float(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def fmt_fraction(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def fmt_ratio(value: float | None, reference: float | None) -> str:
    if value is None or not reference:
        return "-"
    return f"{value / reference:.2f}x"


def fmt_points(value: float | None, reference: float | None) -> str:
    return "-" if value is None or reference is None else f"{100 * (value - reference):+.1f}"


def fmt_accuracy(summary: Summary) -> str:
    mean = fmt_fraction(summary.mean("exact_match"))
    if len(summary.runs) < 2:
        return mean
    return f"{mean} ({', '.join(fmt_fraction(run.exact_match) for run in summary.runs)})"


def tail_mean(values: list[float], fraction: float = 0.1) -> float | None:
    """The mean of the last ``fraction`` of a per-step series (at least one value): less noisy than the last."""
    if not values:
        return None
    tail = values[-max(1, round(fraction * len(values))):]
    return sum(tail) / len(tail)


def at_fraction(values: list[float], fraction: float) -> float | None:
    """The value at ``fraction`` of the run (step ceil(fraction·N))."""
    return values[max(1, math.ceil(fraction * len(values))) - 1] if values else None


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
    return f"{text}; device `{device}`"


def table(header: list[str], lines: list[list[str]]) -> list[str]:
    def cells(values: list[str]) -> str:
        return "| " + " | ".join(" ".join(str(value).split()).replace("|", "/") for value in values) + " |"

    return [cells(header), "|" + "---|" * len(header)] + [cells(line) for line in lines]


def relative_table(summaries: list[Summary], reference: Summary | None) -> list[str]:
    def ref(attribute: str) -> float | None:
        return reference.mean(attribute) if reference else None

    header = ["method", "status", "seeds", "exact match", f"vs {REFERENCE_ROW} (points)", "trainable params",
              f"x {REFERENCE_ROW}", "adapter file bytes", f"x {REFERENCE_ROW}", "peak memory (MiB)", f"x {REFERENCE_ROW}",
              "mean step (s)", f"x {REFERENCE_ROW}", "eval loss", "lr", "note"]
    lines = []
    for s in summaries:
        lr = s.planned.run.lr if s.planned.run else None
        lines.append([
            s.name, s.status, str(len(s.runs)) if s.runs else "-", fmt_accuracy(s),
            fmt_points(s.mean("exact_match"), ref("exact_match")),
            fmt_int(s.first("trainable_params")), fmt_ratio(s.first("trainable_params"), ref("trainable_params")),
            fmt_int(s.first("adapter_bytes")), fmt_ratio(s.first("adapter_bytes"), ref("adapter_bytes")),
            fmt_float(s.mean("peak_memory_mb"), 0), fmt_ratio(s.mean("peak_memory_mb"), ref("peak_memory_mb")),
            fmt_float(s.mean("mean_step_seconds"), 3), fmt_ratio(s.mean("mean_step_seconds"), ref("mean_step_seconds")),
            fmt_float(s.mean("eval_loss"), 4), "-" if lr is None else f"{lr:g}", s.note(),
        ])
    return table(header, lines)


def diagnostics(summary: Summary) -> dict[str, float | None]:
    """Seed 0's diagnostics: train loss and gradient norm along the run, updated fraction, parameter norms."""
    losses, norms = summary.first("train_losses") or [], summary.first("grad_norms") or []
    return {
        "loss_first": losses[0] if losses else None, "loss_quarter": at_fraction(losses, 0.25),
        "loss_half": at_fraction(losses, 0.5), "loss_end": tail_mean(losses),
        "grad_first": norms[0] if norms else None, "grad_end": tail_mean(norms),
        "updated": summary.first("updated_fraction"),
        "norm_start": summary.first("param_norm_start"), "norm_end": summary.first("param_norm_end"),
    }


def diagnostics_table(summaries: list[Summary]) -> list[str]:
    header = ["method", "train loss step 1", "at 25%", "at 50%", "last 10% (mean)", "grad norm step 1",
              "grad norm last 10% (mean)", "entries updated", "param norm start -> end"]
    lines = []
    for s in summaries:
        if s.status != "ok" or s.name == BASE_ROW:
            continue
        d = diagnostics(s)
        lines.append([s.name, fmt_float(d["loss_first"], 3), fmt_float(d["loss_quarter"], 3),
                      fmt_float(d["loss_half"], 3), fmt_float(d["loss_end"], 3), fmt_float(d["grad_first"], 3),
                      fmt_float(d["grad_end"], 3), fmt_fraction(d["updated"]),
                      f"{fmt_float(d['norm_start'], 2)} -> {fmt_float(d['norm_end'], 2)}"])
    return table(header, lines)


def trailing_rows(summaries: list[Summary], reference: Summary | None) -> list[str]:
    """One line of measured facts per row more than TRAILING_POINTS behind the reference, beside the reference's."""
    if reference is None or reference.mean("exact_match") is None:
        return [f"No {REFERENCE_ROW} result yet."]
    ref_accuracy, ref = reference.mean("exact_match"), diagnostics(reference)
    lines = []
    for s in summaries:
        accuracy = s.mean("exact_match")
        if s.name == BASE_ROW or accuracy is None or 100 * (ref_accuracy - accuracy) <= TRAILING_POINTS:
            continue
        d = diagnostics(s)
        lines.append(
            f"- `{s.name}`: {fmt_fraction(accuracy)} vs {fmt_fraction(ref_accuracy)} "
            f"({fmt_points(accuracy, ref_accuracy)} points). Train loss over the last 10% of steps "
            f"{fmt_float(d['loss_end'], 3)} ({REFERENCE_ROW} {fmt_float(ref['loss_end'], 3)}); gradient norm at step 1 "
            f"{fmt_float(d['grad_first'], 3)} ({fmt_float(ref['grad_first'], 3)}), over the last 10% "
            f"{fmt_float(d['grad_end'], 3)} ({fmt_float(ref['grad_end'], 3)}); trainable entries updated "
            f"{fmt_fraction(d['updated'])} ({fmt_fraction(ref['updated'])}); eval loss "
            f"{fmt_float(s.mean('eval_loss'), 3)} ({fmt_float(reference.mean('eval_loss'), 3)}).")
    return lines or [f"None: every measured row is within {TRAILING_POINTS:g} points of {REFERENCE_ROW}."]


def preserved_notes(path: Path) -> str:
    """The hand-written block of an existing report, so that rebuilding the report keeps it."""
    text = path.read_text(encoding="utf-8") if path.exists() else ""
    if NOTES_START in text and NOTES_END in text.split(NOTES_START, 1)[1]:
        return text.split(NOTES_START, 1)[1].split(NOTES_END, 1)[0].strip("\n")
    return ("Why each row above trails LoRA, one sentence per row, written from the diagnostics "
            "(this block is kept when the report is rebuilt).")


def seeds_sentence(options: argparse.Namespace) -> str:
    if options.seeds == 1:
        return "Every row runs with seed 0 only."
    others = ", ".join(str(seed) for seed in range(1, options.seeds))
    return (f"Every row runs with seed 0; the {options.top} best rows by seed-0 accuracy, and {REFERENCE_ROW}, also "
            f"with seed{'s' if options.seeds > 2 else ''} {others} (exact match: the mean, each seed in brackets).")


BUSY_LOAD_PER_CORE = 1.25  # the row's own threads load each core about once; more means company


def busy_timing_note(records: list[dict[str, Any]]) -> list[str]:
    """Rows whose step time was taken while other work shared the cores: their accuracy and memory
    stand, their step time does not (rerun them on an idle machine with --rerun --methods ...)."""
    cores = os.cpu_count() or 1
    busy = sorted({record["row"].name for record in records
                   if record.get("load_average_1min", 0.0) > BUSY_LOAD_PER_CORE * cores})
    if not busy:
        return []
    return [f"- step time taken on a busy machine (1-minute load above {BUSY_LOAD_PER_CORE:g} per core), "
            f"so not comparable: {', '.join(busy)}"]


def render_markdown(summaries: list[Summary], options: argparse.Namespace, store: ResultStore, command: str,
                    ignored: list[str], notes: str) -> str:
    reference = next((s for s in summaries if s.name == REFERENCE_ROW and s.runs), None)
    used = [record for record in store.finished()
            if any(record["row"] is run for s in summaries for run in s.runs)]
    dates = sorted(record["finished"] for record in used)
    machines = sorted({record["machine"] for record in used})
    counts = {status: sum(s.status == status for s in summaries) for status in ("ok", "failed", "pending", "skipped")}
    lines = [
        "# Method comparison",
        "",
        f"Every adapter method trained on **{options.model}**, task `{TASK}` (bundled), {options.steps} optimizer "
        f"steps of {BATCH_SIZE} packed rows x {MAX_SEQ_LEN} tokens (as in the demo: cosine schedule after "
        f"{warmup_steps(options.steps)} warm-up steps), then scored on the first "
        f"{options.eval_examples} held-out problems: greedy exact match, and eval loss (mean per answer token). "
        "Layer methods adapt the upper half of the decoder layers. Learning rates are per method (the `lr` "
        "column: typical values from each method's paper or PEFT's examples, not tuned here; the LoRA family's "
        f"1e-3 is the demo's). {seeds_sentence(options)} Columns `x {REFERENCE_ROW}` divide by {REFERENCE_ROW}'s "
        "value (mean over its seeds).",
        "",
        f"- command: `{command}` (resumable: rerun it until no row is pending)",
        f"- results: `{RESULTS_FILE}` beside this file, {len(used)} measurements"
        + (f", finished {dates[0]} to {dates[-1]}" if dates else ""),
        "- machine: " + ("; ".join(machines) if machines else "-"),
        "- rows: " + ", ".join(f"{count} {status}" for status, count in counts.items() if count)
        + (" (a subset chosen with --methods)" if options.methods else " (every registered method)"),
        "- peak memory: the row's own child process (max RSS on CPU, which includes the base model and "
        "generation; max allocated on CUDA)",
        "- mean step: wall time between optimizer steps 2..N (step 1 holds warm-up); data-driven inits "
        "(CorDA, EVA, LoRA-GA) calibrate before step 1, so their cost is not in it",
        *busy_timing_note(used),
        *[f"- {note}" for note in ignored],
        "",
        *relative_table(summaries, reference),
        "",
        "## Diagnostics",
        "",
        "Seed 0 of each row. Gradient norm: all trainable parameters, before clipping (max norm 1). Entries "
        "updated: the fraction of trainable entries that received a non-zero gradient at some step (AdamW with "
        "weight decay 0 moves exactly those). Parameter norm: all trainable parameters before the first and "
        "after the last step.",
        "",
        *diagnostics_table(summaries),
        "",
        f"## Rows more than {TRAILING_POINTS:g} points behind {REFERENCE_ROW}",
        "",
        f"Measured, beside {REFERENCE_ROW}'s value in brackets:",
        "",
        *trailing_rows(summaries, reference),
        "",
        NOTES_START,
        notes,
        NOTES_END,
        "",
        "## Adapter settings",
        "",
        "Functions of the model (`<upper_layers>`: the upper half of the decoder layers) are resolved per model "
        "in `bench/method_comparison.py`.",
        "",
        *[f"- `{s.name}`: `{json.dumps(symbolic_adapter(s.planned.run))}`" for s in summaries if s.planned.run],
        "",
        "![method comparison](method_comparison.png)",
        "",
    ]
    return "\n".join(lines)


def plot_summaries(summaries: list[Summary], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from tuneforge.fileio import atomic_write

    measured = [s for s in summaries if s.runs and s.mean("exact_match") is not None]
    trained = [s for s in measured if s.first("trainable_params")]
    reference = next((s for s in measured if s.name == REFERENCE_ROW), None)
    timed = [s for s in trained if s.mean("mean_step_seconds") is not None]
    figure, (scatter, accuracy, steps) = plt.subplots(
        1, 3, figsize=(20, max(5.0, 0.28 * len(trained) + 1.5)), gridspec_kw={"width_ratios": [2, 1, 1]})
    scatter.scatter([s.first("trainable_params") for s in trained], [100 * s.mean("exact_match") for s in trained])
    for index, s in enumerate(sorted(trained, key=lambda s: s.first("trainable_params"))):
        # Staggered label heights: neighbours on the log axis often share an accuracy.
        scatter.annotate(s.name, (s.first("trainable_params"), 100 * s.mean("exact_match")), fontsize=7,
                         xytext=(3, 3 + 9 * (index % 4)), textcoords="offset points")
    base = next((s for s in measured if s.name == BASE_ROW), None)
    if base is not None:
        scatter.axhline(100 * base.mean("exact_match"), color="grey", linestyle="--", label="base model")
    if reference is not None:
        scatter.axhline(100 * reference.mean("exact_match"), color="tab:orange", linestyle=":", label=REFERENCE_ROW)
    if base is not None or reference is not None:
        scatter.legend()
    if trained:
        scatter.set_xscale("log")
    scatter.set_ylim(-3, 103)
    scatter.set_xlabel("trainable parameters (log scale)")
    scatter.set_ylabel("held-out exact match (%)")
    scatter.set_title("accuracy vs trainable parameters")
    ranked = sorted(trained, key=lambda s: -s.mean("exact_match"))
    means = [100 * s.mean("exact_match") for s in ranked]
    scores = [[100 * run.exact_match for run in s.runs if run.exact_match is not None] for s in ranked]
    spread = [[m - min(seeds) for m, seeds in zip(means, scores)], [max(seeds) - m for m, seeds in zip(means, scores)]]
    accuracy.barh([s.name for s in ranked], means, xerr=spread)
    accuracy.invert_yaxis()
    accuracy.set_xlim(0, 103)
    accuracy.set_xlabel("exact match (%), seed range as error bar")
    accuracy.set_title("accuracy")
    accuracy.tick_params(axis="y", labelsize=7)
    reference_step = reference.mean("mean_step_seconds") if reference else None
    step_values = [s.mean("mean_step_seconds") / (reference_step or 1.0) for s in timed]
    steps.barh([s.name for s in timed], step_values)
    steps.invert_yaxis()
    steps.set_xlabel(f"mean step time (x {REFERENCE_ROW})" if reference_step else "mean step time (s)")
    steps.set_title("step time")
    steps.tick_params(axis="y", labelsize=7)
    figure.tight_layout()
    atomic_write(path, lambda tmp: figure.savefig(tmp, format="png", dpi=110))
    plt.close(figure)


RUN_CONTROL_FLAGS = {"--report-only": 0, "--rerun": 0, "--max-minutes": 1, "--limit": 1, "--jobs": 1}


def reproduce_command(argv: list[str]) -> str:
    """The command that builds the table: this invocation's arguments without the ones that only steer
    one run (how long, how many rows at once, report only), which do not change the results."""
    kept, skip = [], 0
    for arg in argv:
        if skip:
            skip -= 1
            continue
        flag = arg.split("=", 1)[0]
        if flag in RUN_CONTROL_FLAGS:
            skip = RUN_CONTROL_FLAGS[flag] if "=" not in arg else 0
            continue
        kept.append(arg)
    return ("python bench/method_comparison.py " + shlex.join(kept)).strip()


def write_report(plan: list[PlannedRow], options: argparse.Namespace, store: ResultStore, command: str,
                 ignored: list[str]) -> tuple[Path, Path]:
    from tuneforge.fileio import atomic_write_text

    output_dir = Path(options.output_dir)
    summaries = summarize(plan, options, store)
    markdown_path = output_dir / "method_comparison.md"
    text = render_markdown(summaries, options, store, command, ignored, preserved_notes(markdown_path))
    markdown = atomic_write_text(markdown_path, text)
    figure = output_dir / "method_comparison.png"
    plot_summaries(summaries, figure)
    return markdown, figure


# ---------------------------------------------------------------------------------------------
# Command line


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", help="comma-separated row names (default: base + every registered method); "
                                          "e.g. lora,lora-pissa,ia3")
    parser.add_argument("--steps", type=int, default=100,
                        help="optimizer steps per method (same for all; 100 is where the demo's LoRA converges)")
    parser.add_argument("--eval-examples", type=int, default=64, help="held-out problems for accuracy and eval loss")
    parser.add_argument("--seeds", type=int, default=2, help="seeds for the top rows (every row gets seed 0)")
    parser.add_argument("--top", type=int, default=10, help="how many rows (by seed-0 accuracy) get every seed")
    parser.add_argument("--model", default="smollm2-135m", choices=["smollm2-135m", "tiny"])
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto")
    parser.add_argument("--output-dir", default="docs",
                        help=f"where {RESULTS_FILE} (the results) and method_comparison.md/.png are written")
    parser.add_argument("--work-dir", default="/tmp/tuneforge-method-comparison", help="run directories and logs")
    parser.add_argument("--jobs", type=int, default=1, help="rows run at once (>1 disturbs step times)")
    parser.add_argument("--max-minutes", type=float, help="start no row after this many minutes (rows running finish)")
    parser.add_argument("--limit", type=int, help="run at most this many rows in this invocation")
    parser.add_argument("--rerun", action="store_true",
                        help=f"measure every row again, ignoring the lines already in {RESULTS_FILE}")
    parser.add_argument("--report-only", action="store_true", help="rebuild the table and plot from the results; run nothing")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    options = parser.parse_args(argv)
    for flag in ("steps", "eval_examples", "jobs", "seeds", "top"):
        if getattr(options, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(options, flag)}")
    if options.limit is not None and options.limit < 0:
        parser.error(f"--limit must be at least 0, got {options.limit}")
    if options.max_minutes is not None and options.max_minutes <= 0:
        parser.error(f"--max-minutes must be positive, got {options.max_minutes}")
    return options


def main(argv: list[str] | None = None) -> list[Summary]:
    options = parse_arguments(argv)
    if options.child:
        raise SystemExit(child_main(options))
    from tuneforge.train.strategy import resolve_device

    options.device = str(resolve_device(options.device))
    selected = [name.strip() for name in options.methods.split(",") if name.strip()] if options.methods else None
    plan, ignored = plan_rows(selected, registered_methods())
    for note in ignored:
        print(f"note: {note}", flush=True)
    store = ResultStore(Path(options.output_dir) / RESULTS_FILE, read_existing=not options.rerun)
    command = reproduce_command(sys.argv[1:] if argv is None else argv)
    print(f"method comparison: {len(plan)} rows on {options.model}, {options.steps} steps each, device {options.device}; "
          f"results in {store.path}", flush=True)
    if not options.report_only:
        run_comparison(plan, options, store)
    summaries = summarize(plan, options, store)
    markdown, figure = write_report(plan, options, store, command.strip(), ignored)
    failed = [s.name for s in summaries if s.status == "failed"]
    pending = [s.name for s in summaries if s.status == "pending"]
    print(f"wrote {markdown} and {figure}" + (f"; failed: {', '.join(failed)}" if failed else "")
          + (f"; pending (run again): {', '.join(pending)}" if pending else ""), flush=True)
    return summaries


if __name__ == "__main__":
    main()
