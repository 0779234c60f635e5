"""The supervised finetuning loop: one readable function, no trainer class tree.

    for each optimizer step:
        for each of grad_accum micro-batches: forward (chunked CE on labelled tokens), backward
        clip -> optimizer.step -> scheduler.step -> log / eval / checkpoint

Everything needed to continue exactly (adapter, optimizer, scheduler, RNG, data position) is in
each checkpoint; Ctrl-C saves one and exits cleanly.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import torch
from torch import nn

from tuneforge.adapters import add_adapter, trainable_parameters
from tuneforge.adapters.hooks import HookChain, training_hooks
from tuneforge.adapters.peft_format import save_adapter
from tuneforge.config.schema import TrainConfig
from tuneforge.eval.loss import autocast, evaluate_loss
from tuneforge.train.checkpoint import TrainState, latest_checkpoint, load_checkpoint, save_checkpoint
from tuneforge.train.compile import compile_decoder_layers, eager_only
from tuneforge.train.data_setup import PreparedData, prepare_data
from tuneforge.losses import token_loss_sum
from tuneforge.train.metrics import MetricsLog, plot_loss_curve
from tuneforge.train.optim import build_optimizer, build_scheduler
from tuneforge.train.progress import TrainProgress
from tuneforge.train.report import RunSummary, save_summary
from tuneforge.train.run_dir import prepare_run_dir
from tuneforge.train.strategy import pick_strategy, resolve_device

ADAPTER_NAME = "default"


def train(config: TrainConfig, *, resume: bool = False, overwrite: bool = False, model_and_tokenizer=None,
          on_step: Callable[[int, float], None] | None = None,
          prepare_adapter: Callable[[nn.Module], None] | None = None) -> RunSummary:
    """Finetune ``config.model`` with ``config.adapter`` on ``config.data``; returns the summary.

    ``model_and_tokenizer`` lets tests and benchmarks pass an already-built model. ``prepare_adapter``
    runs once the adapter is attached and before the optimizer is built: federated clients load the
    global adapter there (and may freeze parts of it).
    """
    run_dir = prepare_run_dir(config, resume, overwrite)
    torch.manual_seed(config.training.seed)
    device = resolve_device(config.device)
    strategy = pick_strategy(device)
    model, tokenizer = model_and_tokenizer or _load_base(config, device)
    data = prepare_data(config, tokenizer)
    if config.quantization is not None and model_and_tokenizer is not None:
        _quantize_base(model, config, device)  # a model we did not load: quantize it in place
    torch.manual_seed(config.training.seed)  # adapter init must not depend on what loading consumed
    add_adapter(model, config.adapter, ADAPTER_NAME, **_attach_options(config, tokenizer))
    model.to(device)
    if prepare_adapter is not None:
        prepare_adapter(model)
    hooks = training_hooks(model, ADAPTER_NAME)
    if hooks.needs_data():
        hooks.prepare(model, _init_batches(data, strategy, config.training.init_batches),
                      lambda m, batch: _mean_token_loss(m, batch, config.training))
    if config.training.gradient_checkpointing:
        _enable_gradient_checkpointing(model)
    if config.training.compile:
        compile_decoder_layers(model)
    total_steps = planned_steps(config, data)
    optimizer = build_optimizer(model, config.training)
    scheduler = build_scheduler(optimizer, config.training, total_steps)
    state = TrainState()
    checkpoint = latest_checkpoint(run_dir) if resume else None
    if checkpoint is not None:
        state = load_checkpoint(checkpoint, model, ADAPTER_NAME, optimizer, scheduler, hooks)
    log = MetricsLog(run_dir, resume_step=state.step if resume else None)
    progress = TrainProgress(total_steps, state.step, enabled=strategy.is_main)
    trainable, total = trainable_parameters(model)
    progress.note(f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.3f}%)"
                  + (f"; resuming from {checkpoint.name}" if checkpoint else ""))
    base_name = config.model
    interrupted = False
    start = time.perf_counter()
    elapsed_before = state.elapsed_seconds
    tokens_at_start = state.tokens_seen
    position = (state.epoch, state.batch_index)  # data position before the step in progress
    last_loss = None
    step_seconds = 0.0
    model.train()
    if state.step == 0:  # the starting point of the eval curve
        _evaluate_and_check_stop(model, data, config, state, log, progress, strategy)
    try:
        with progress:
            while state.step < total_steps:
                step_start = time.perf_counter()
                position = (state.epoch, state.batch_index)
                loss, tokens = _optimizer_step(model, optimizer, scheduler, data, state, config, strategy,
                                               hooks, total_steps)
                step_seconds += time.perf_counter() - step_start
                state.step += 1
                position = (state.epoch, state.batch_index)
                state.tokens_seen += tokens
                last_loss = loss
                elapsed = elapsed_before + time.perf_counter() - start
                # Throughput of the optimizer steps alone: evaluation and checkpoint time excluded.
                rate = (state.tokens_seen - tokens_at_start) / max(step_seconds, 1e-9)
                lr = scheduler.get_last_lr()[0]
                progress.update(state.step, loss, lr, rate)
                if state.step % config.training.log_every == 0 or state.step in (1, total_steps):
                    log.log({"step": state.step, "train_loss": loss, "lr": lr, "tokens_per_second": rate,
                             "tokens_seen": state.tokens_seen, "elapsed_seconds": elapsed, "epoch": state.epoch})
                if on_step is not None:
                    on_step(state.step, loss)
                if _due(config.training.eval_every, state.step) or state.step == total_steps:
                    if _evaluate_and_check_stop(model, data, config, state, log, progress, strategy):
                        progress.note(f"early stopping at step {state.step}: no better eval loss in "
                                      f"{config.training.early_stopping_patience} evaluations")
                        break
                if _due(config.training.save_every, state.step) and state.step < total_steps:
                    state.elapsed_seconds = elapsed
                    save_checkpoint(run_dir, model, ADAPTER_NAME, optimizer, scheduler, state,
                                    config.training.keep_checkpoints, base_name, hooks)
    except KeyboardInterrupt:
        interrupted = True
        # A step cut short mid-accumulation is redone on resume: rewind to the data it started from.
        state.epoch, state.batch_index = position
        optimizer.zero_grad(set_to_none=True)
        state.elapsed_seconds = elapsed_before + time.perf_counter() - start
        path = save_checkpoint(run_dir, model, ADAPTER_NAME, optimizer, scheduler, state,
                               config.training.keep_checkpoints, base_name, hooks)
        progress.note(f"interrupted: saved {path}; continue with --resume")
    train_seconds = time.perf_counter() - start
    adapter_dir = save_adapter(model, run_dir / "adapter", ADAPTER_NAME, base_model_name=base_name,
                               base_quantization=config.quantization.model_dump(mode="json") if config.quantization else None)
    log.close()
    plot_loss_curve(run_dir)
    summary = RunSummary(
        run_dir=run_dir, adapter_dir=adapter_dir, steps=state.step, train_seconds=train_seconds,
        tokens_per_second=(state.tokens_seen - tokens_at_start) / max(step_seconds, 1e-9),
        peak_memory_mb=peak_memory_mb(device), final_train_loss=last_loss,
        best_eval_loss=state.best_eval_loss, trainable_params=trainable, total_params=total,
        interrupted=interrupted,
    )
    save_summary(summary)
    return summary


def _attach_options(config: TrainConfig, tokenizer) -> dict:
    """A model-level method whose attach takes the tokenizer gets it (prompt tuning's text init)."""
    import inspect

    from tuneforge.adapters import get_method

    attach = get_method(config.adapter.method).attach
    return {"tokenizer": tokenizer} if attach is not None and "tokenizer" in inspect.signature(attach).parameters else {}


def _load_base(config: TrainConfig, device: torch.device):
    from tuneforge.models import load_model

    quantization = _quant_settings(config, device) if config.quantization is not None else None
    # QLoRA: the Linear layers are quantized as they are read, so the full-precision model never exists.
    loaded = load_model(config.model, dtype=config.dtype, device=str(device), quantization=quantization)
    return loaded.model, loaded.tokenizer


def _quant_settings(config: TrainConfig, device: torch.device) -> dict:
    from tuneforge.quant.presets import compute_dtype_for

    quant = config.quantization
    return dict(bits=quant.bits, quant_type=quant.type, double_quant=quant.double_quant, blocksize=quant.blocksize,
                compute_dtype=compute_dtype_for(quant.compute_dtype, device), skip_modules=quant.skip_modules)


def _quantize_base(model: nn.Module, config: TrainConfig, device: torch.device) -> None:
    """QLoRA on a model passed in: its Linear layers become 4-bit (or int8) before the adapter is added."""
    from tuneforge.quant import quantize_model

    quantize_model(model, **_quant_settings(config, device))


def _enable_gradient_checkpointing(model: nn.Module) -> None:
    # With a frozen embedding the checkpointed blocks would see inputs without grad and skip
    # backward through adapters; non-reentrant checkpointing does not have that problem.
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x spelling
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False


def planned_steps(config: TrainConfig, data: PreparedData) -> int:
    if config.training.max_steps is not None:
        return config.training.max_steps
    per_epoch = data.plan.num_batches / config.training.grad_accum
    return max(1, math.ceil(per_epoch * config.training.epochs))


def _due(every: int | None, step: int) -> bool:
    return every is not None and step % every == 0


def _next_batch(data: PreparedData, state: TrainState) -> tuple[dict[str, torch.Tensor], int]:
    """The next micro-batch and its real (unpadded) token count; advances the data position."""
    if state.batch_index >= data.plan.num_batches:
        state.epoch += 1
        state.batch_index = 0
    batches = data.plan.batches(state.epoch)
    units = batches.units[state.batch_index]
    batch = batches[state.batch_index]
    state.batch_index += 1
    return batch, sum(data.plan.unit_lengths[u] for u in units)


def _init_batches(data: PreparedData, strategy, count: int) -> list[dict[str, torch.Tensor]]:
    """The first ``count`` training batches of epoch 0, for data-driven adapter inits."""
    batches = data.plan.batches(0)
    return [strategy.to_device(batches[i]) for i in range(min(count, data.plan.num_batches))]


def _mean_token_loss(model, batch, training) -> torch.Tensor:
    with autocast(training.precision, batch["input_ids"].device):
        loss_sum, _ = token_loss_sum(model, batch, training.loss_chunk_size)
    return loss_sum / max(1, int((batch["labels"][:, 1:] != -100).sum()))


def _optimizer_step(model, optimizer, scheduler, data, state, config: TrainConfig, strategy,
                    hooks: HookChain, total_steps: int) -> tuple[float, int]:
    training = config.training
    fetched = [_next_batch(data, state) for _ in range(training.grad_accum)]
    micro_batches = [strategy.to_device(batch) for batch, _ in fetched]
    tokens = sum(count for _, count in fetched)
    # Normalise by the labelled tokens of the whole accumulated step, so accumulation equals one big batch.
    labelled = sum(int((b["labels"][:, 1:] != -100).sum()) for b in micro_batches)
    labelled = max(1, int(strategy.reduce_sum(labelled)))
    loss_sum = 0.0
    for batch in micro_batches:
        with autocast(training.precision, batch["input_ids"].device):
            batch_loss, _ = token_loss_sum(model, batch, training.loss_chunk_size)
        loss = batch_loss / labelled
        extra = hooks.extra_loss(model)
        if extra is not None:
            loss = loss + extra / len(micro_batches)
        loss.backward()
        loss_sum += float(batch_loss.detach())
    if training.max_grad_norm is not None:
        params = [p for g in optimizer.param_groups for p in g["params"]]
        torch.nn.utils.clip_grad_norm_(params, training.max_grad_norm)
    hooks.before_optimizer_step(model, state.step, total_steps)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    hooks.after_optimizer_step(model, state.step, total_steps)
    return loss_sum / labelled, tokens


def _evaluate_and_check_stop(model, data: PreparedData, config: TrainConfig, state: TrainState,
                             log: MetricsLog, progress, strategy) -> bool:
    if not data.eval_batches:
        return False
    with eager_only():
        eval_loss = evaluate_loss(model, data.eval_batches, config.training.precision,
                                  config.training.loss_chunk_size, strategy.device)
    log.log({"step": state.step, "eval_loss": eval_loss, "eval_perplexity": math.exp(min(eval_loss, 50))})
    state.history.append({"step": state.step, "eval_loss": eval_loss})
    progress.note(f"step {state.step}: eval loss {eval_loss:.4f} (perplexity {math.exp(min(eval_loss, 50)):.2f})")
    if state.best_eval_loss is None or eval_loss < state.best_eval_loss:
        state.best_eval_loss = eval_loss
        state.evals_without_improvement = 0
        return False
    state.evals_without_improvement += 1
    patience = config.training.early_stopping_patience
    return patience is not None and state.evals_without_improvement >= patience


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
