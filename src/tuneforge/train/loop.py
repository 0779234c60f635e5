"""The supervised finetuning loop: one readable function, no trainer class tree.

    for each optimizer step:
        for each of grad_accum micro-batches: forward (chunked CE on labelled tokens), backward
        clip -> optimizer.step (skipped when the loss or gradient norm is not finite) -> scheduler.step
        (an update rule that takes the whole step -- LOMO, MeZO -- does forward..update itself; update_rules/)
        -> log / eval (loss; exact match with training.eval_generate) / checkpoint

Everything needed to continue exactly (adapter, optimizer, scheduler, RNG, data position) is in
each checkpoint; Ctrl-C saves one and exits cleanly.
"""

from __future__ import annotations

import math
import os
import shutil
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from tuneforge.adapters import add_adapter, trainable_parameters
from tuneforge.adapters.hooks import HookChain, TrainingHooks, training_hooks
from tuneforge.adapters.lora.fused import fuse_projections, unfuse_projections
from tuneforge.adapters.peft_format import save_adapter
from tuneforge.config.full_ft import NO_LOSS_SCALER
from tuneforge.config.schema import TrainConfig
from tuneforge.errors import ConfigError
from tuneforge.eval.generation import gold_answer, require_gold_answers, score_generation
from tuneforge.select.training import plan_training_selection
from tuneforge.losses import token_loss_sum
from tuneforge.models.precision import autocast, choose_precision, loss_scaler, without_loss_scaler
from tuneforge.train.allocator import use_lean_cpu_allocator
from tuneforge.train.checkpoint import (
    CheckpointError,
    TrainState,
    fsync_tree,
    latest_checkpoint,
    load_checkpoint,
    remove_stale_temp_dirs,
    replace_dir,
    save_checkpoint,
    save_sharded_checkpoint,
)
from tuneforge.train.compile import compile_decoder_layers, eager_only
from tuneforge.train.data_setup import PreparedData, eval_source, prepare_data
from tuneforge.train.full import FullWeights, is_full_finetune, save_full_model
from tuneforge.train.metrics import DiscardedLog, MetricsLog, plot_loss_curve, plot_objective_metrics
from tuneforge.train.nonfinite import NonFiniteGuard, StepOutcome, require_finite_adapter
from tuneforge.train.objectives import Objective, build_objective
from tuneforge.train.objectives.reference import start_from_init_adapter
from tuneforge.train.optim import build_scheduler
from tuneforge.train.progress import TrainProgress
from tuneforge.train.report import RunSummary, save_summary
from tuneforge.train.run_dir import check_run_dir, claim_run_dir, discard_replaced_runs
from tuneforge.train.sharded_load import plan_sharded_load
from tuneforge.train.strategy import pick_strategy, resolve_device
from tuneforge.train.update_rules import UpdateRule, build_update_rule

ADAPTER_NAME = "default"
EXTRA_GENERATED_TOKENS = 8  # generated past the longest gold answer (its tokens may split differently)


def train(config: TrainConfig, *, resume: bool = False, overwrite: bool = False, resume_anyway: bool = False,
          model_and_tokenizer=None, on_step: Callable[[int, float], None] | None = None,
          prepare_adapter: Callable[[nn.Module], None] | None = None,
          make_update_rule: Callable[[nn.Module, TrainConfig, bool], UpdateRule] | None = None,
          extra_hooks: Callable[[nn.Module], list[TrainingHooks]] | None = None) -> RunSummary:
    """Finetune ``config.model`` with ``config.adapter`` on ``config.data``; returns the summary.

    ``model_and_tokenizer`` lets tests and benchmarks pass an already-built model. Nothing in
    ``output_dir`` changes until the config, data and model have loaded (see run_dir.py).
    ``prepare_adapter`` runs once the adapter is attached and before the optimizer is built: federated
    clients load the global adapter there (and may freeze parts of it). ``make_update_rule(model, config,
    full_finetune)`` replaces ``build_update_rule``: FedKSeed clients draw MeZO's seeds from a shared pool.
    ``extra_hooks(model)`` returns training hooks added after the adapter method's own (continual
    learning's penalties and gradient masks).
    """
    resume = resume or resume_anyway
    # A private copy: methods record run facts on their config (AdaLoRA's total_step), and the caller's
    # object must stay what it passed (a resume with the same object compares equal to the saved one).
    config = config.model_copy(deep=True)
    run_dir = check_run_dir(config, resume, overwrite, resume_anyway)
    check_eval_generate(config)
    check_objective_combinations(config)
    if config.training.cpu_memory == "lean":
        use_lean_cpu_allocator()  # before anything large is allocated
    torch.manual_seed(config.training.seed)
    strategy = pick_strategy(resolve_device(config.device), config)  # torchrun: DDP, this rank's device
    device = strategy.device
    precision_note = _resolve_precision(config, device)
    selection = plan_training_selection(config, run_dir)  # every selection check, before the model loads
    sharded_load = plan_sharded_load(config, strategy) if model_and_tokenizer is None else None
    model, tokenizer = model_and_tokenizer or (sharded_load.empty_model() if sharded_load else _load_base(config, device))
    data = prepare_data(config, tokenizer, select=selection.bind(model, tokenizer) if selection else None)
    if config.training.eval_generate:
        require_gold_answers(data.eval_examples[: config.training.eval_generate])
    if config.quantization is not None and model_and_tokenizer is not None:
        _quantize_base(model, config, device)  # a model we did not load: quantize it in place
    torch.manual_seed(config.training.seed)  # adapter init must not depend on what loading consumed
    full = is_full_finetune(config.adapter)
    full_weights = FullWeights(model, config.adapter) if full else None  # the model's own weights train
    if not full:
        add_adapter(model, config.adapter, ADAPTER_NAME, **_attach_options(config, tokenizer))
        start_from_init_adapter(model, config.training, ADAPTER_NAME)
    if sharded_load is None:  # a sharded load puts each rank's rows on the device itself
        model.to(device)
    objective = build_objective(config, tokenizer, ADAPTER_NAME)
    if prepare_adapter is not None:
        prepare_adapter(model)
    hooks = HookChain([]) if full else training_hooks(model, ADAPTER_NAME)
    if extra_hooks is not None:
        hooks = HookChain([*hooks.hooks, *extra_hooks(model)])
    if hooks.needs_data():
        hooks.prepare(model, _init_batches(data, strategy, config.training.init_batches),
                      lambda m, batch: _mean_token_loss(m, batch, config.training))
    fused_note = None if full else _fuse_projections(model, config.training)
    if config.training.gradient_checkpointing:
        _enable_gradient_checkpointing(model)
    if config.training.compile:
        compile_decoder_layers(model)
    total_steps = planned_steps(config, data)
    strategy.prepare(model, fill=sharded_load.fill if sharded_load else None)  # wrap now the trainable parameters are final
    rule = (make_update_rule or build_update_rule)(model, config, full)
    optimizer = rule.optimizer
    scheduler = build_scheduler(optimizer, config.training, total_steps)
    scaler = loss_scaler(config.training.precision, device)
    state = TrainState()
    checkpoint = latest_checkpoint(run_dir) if resume else None
    if checkpoint is not None:
        state, saved = load_checkpoint(checkpoint, model, ADAPTER_NAME, optimizer, scheduler, hooks, full_weights)
        rule.load_state_dict(saved.get("update_rule", {}))
        if scaler is not None and "scaler" in saved:
            scaler.load_state_dict(saved["scaler"])
    if strategy.is_main:  # one writer: rank 0
        claim_run_dir(config, run_dir, resume, overwrite)  # everything loaded: only now may an old run move aside
        if selection is not None:
            selection.record()
        remove_stale_temp_dirs(run_dir)
    guard = NonFiniteGuard(config.training.max_nonfinite_steps)
    log = MetricsLog(run_dir, resume_step=state.step if resume else None) if strategy.is_main else DiscardedLog()
    progress = TrainProgress(total_steps, state.step, enabled=strategy.is_main)
    trainable, total = trainable_parameters(model)
    progress.note(f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.3f}%)"
                  + (f"; resuming from {checkpoint.name}" if checkpoint else ""))
    load_note = (f"each of the {strategy.world_size} ranks read only its rows of the weights "
                 "(distributed.fsdp.load_shards)") if sharded_load else None
    notes = (precision_note, fused_note, strategy.layout_note(), load_note)
    progress.note("; ".join(note for note in notes if note))
    base_name = config.model

    def save(reason: str) -> Path | None:
        if strategy.shards_state and reason == "interrupt":
            return None  # FSDP saves are collective, and the other ranks may be gone: resume from the last scheduled one
        require_finite_adapter(model, state.step, f"the {reason} checkpoint", _name_of(latest_checkpoint(run_dir)),
                               count_elsewhere=strategy.reduce_sum if strategy.shards_state else None)
        if strategy.shards_state:  # FSDP: every rank writes its shards (DCP)
            return save_sharded_checkpoint(run_dir, model, optimizer, scheduler, state, config.training.keep_checkpoints,
                                           strategy.is_main, hooks, extra={"update_rule": rule.state_dict()})
        if not strategy.is_main:  # DDP: every rank holds the same adapter and optimizer state; rank 0 saves it
            return None
        path = save_checkpoint(run_dir, model, ADAPTER_NAME, optimizer, scheduler, state,
                               config.training.keep_checkpoints, base_name, hooks,
                               extra={"update_rule": rule.state_dict(),
                                      **({"scaler": scaler.state_dict()} if scaler is not None else {})},
                               full_weights=full_weights)
        discard_replaced_runs(run_dir)  # the new run now has a checkpoint of its own
        return path

    interrupted = False
    start = time.perf_counter()
    elapsed_before = state.elapsed_seconds
    tokens_at_start = state.tokens_seen
    position = (state.epoch, state.batch_index)  # data position before the step in progress
    last_loss = None
    step_seconds = 0.0
    model.train()
    try:
        if state.step == 0:  # the starting point of the eval curve
            _evaluate_and_check_stop(model, tokenizer, data, config, state, log, progress, strategy, objective)
        with progress:
            while state.step < total_steps:
                step_start = time.perf_counter()
                position = (state.epoch, state.batch_index)
                outcome = _optimizer_step(model, rule, scheduler, scaler, guard, data, state, config, strategy,
                                          hooks, total_steps, objective)
                step_seconds += time.perf_counter() - step_start
                state.step += 1
                position = (state.epoch, state.batch_index)
                state.tokens_seen += outcome.tokens
                elapsed = elapsed_before + time.perf_counter() - start
                # Throughput of the optimizer steps alone: evaluation and checkpoint time excluded.
                rate = (state.tokens_seen - tokens_at_start) / max(step_seconds, 1e-9)
                last_loss = outcome.loss if outcome.applied else last_loss
                _report_step(outcome, state, scheduler.get_last_lr()[0], rate, elapsed, guard, log, progress,
                             config.training.log_every, total_steps)
                if on_step is not None:
                    on_step(state.step, outcome.loss)
                if _due(config.training.eval_every, state.step) or state.step == total_steps:
                    if _evaluate_and_check_stop(model, tokenizer, data, config, state, log, progress, strategy, objective):
                        progress.note(f"early stopping at step {state.step}: no better eval loss in "
                                      f"{config.training.early_stopping_patience} evaluations")
                        break
                if _due(config.training.save_every, state.step) and state.step < total_steps:
                    state.elapsed_seconds = elapsed
                    save("scheduled")
    except KeyboardInterrupt:
        interrupted = True
        # A step cut short mid-accumulation is redone on resume: rewind to the data it started from.
        state.epoch, state.batch_index = position
        optimizer.zero_grad(set_to_none=True)
        state.elapsed_seconds = elapsed_before + time.perf_counter() - start
        progress.note(f"interrupted: saved {save('interrupt')}; continue with --resume")
    finally:
        log.close()
    train_seconds = time.perf_counter() - start
    if strategy.shards_state:
        optimizer.state.clear()  # the final save needs no AdamW state: free it before rank 0 gathers whole weights
    strategy.gather_full_weights(model)  # FSDP: rank 0's model now holds whole tensors (a collective)
    unfuse_projections(model)  # the caller gets a model whose base layers own their weights
    if strategy.is_main:
        require_finite_adapter(model, state.step, "the final adapter", _name_of(latest_checkpoint(run_dir)))
        adapter_dir = (_save_final_model(model, tokenizer, run_dir) if full else _save_final_adapter(model, run_dir, config))
        discard_replaced_runs(run_dir)
        plot_loss_curve(run_dir)
        plot_objective_metrics(run_dir)  # preference/reward metrics (no file for SFT)
    else:
        adapter_dir = run_dir / ("model" if full else "adapter")
    summary = RunSummary(
        run_dir=run_dir, adapter_dir=adapter_dir, steps=state.step, train_seconds=train_seconds,
        tokens_per_second=(state.tokens_seen - tokens_at_start) / max(step_seconds, 1e-9),
        peak_memory_mb=peak_memory_mb(device), final_train_loss=last_loss,
        best_eval_loss=state.best_eval_loss, trainable_params=trainable, total_params=total,
        interrupted=interrupted, nonfinite_steps=guard.skipped,
    )
    if strategy.is_main:
        save_summary(summary)
    return summary


def _report_step(outcome: StepOutcome, state: TrainState, lr: float, rate: float, elapsed: float,
                 guard: NonFiniteGuard, log: MetricsLog, progress: TrainProgress, log_every: int, total_steps: int) -> None:
    """The progress line and, every ``log_every`` steps (and on every skipped step), a metrics line."""
    if outcome.applied:
        progress.update(state.step, outcome.loss, lr, rate)
    else:
        progress.note(guard.note(outcome, state.step))
    if outcome.applied and state.step % log_every != 0 and state.step not in (1, total_steps):
        return
    log.log({"step": state.step, "train_loss": _finite_or_none(outcome.loss), "grad_norm": _finite_or_none(outcome.grad_norm),
             "lr": lr, "tokens_per_second": rate, "tokens_seen": state.tokens_seen, "elapsed_seconds": elapsed,
             "epoch": state.epoch, "nonfinite_steps": guard.skipped, **getattr(outcome, "metrics", {}),
             **({} if outcome.applied else {"skipped": True})})


def _save_final_adapter(model: nn.Module, run_dir: Path, config: TrainConfig) -> Path:
    """The run's ``adapter/``, written whole or not at all."""
    quantization = config.quantization.model_dump(mode="json") if config.quantization else None
    return _write_whole(run_dir, "adapter", lambda tmp: save_adapter(
        model, tmp, ADAPTER_NAME, base_model_name=config.model, base_quantization=quantization))


def _save_final_model(model: nn.Module, tokenizer, run_dir: Path) -> Path:
    """A full finetune's ``model/``: a transformers directory, written whole or not at all."""
    return _write_whole(run_dir, "model", lambda tmp: save_full_model(model, tmp, tokenizer))


def _write_whole(run_dir: Path, name: str, write: Callable[[Path], None]) -> Path:
    """``write`` into a temporary folder, fsync it, then rename it to ``run_dir/name``; a failed write
    (disk full) leaves the previous folder and the latest checkpoint as they were."""
    final = run_dir / name
    tmp = run_dir / f".tmp-{name}-{os.getpid()}"
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        write(tmp)
        fsync_tree(tmp)
        replace_dir(tmp, final)
        return final
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        kept = latest_checkpoint(run_dir)
        raise CheckpointError(
            f"could not save the final {name} in {final}: {exc.strerror or exc}"
            + (f"; checkpoint {kept} is kept: free space and --resume to save it" if kept else "")
        ) from None


def _name_of(path: Path | None) -> str | None:
    return str(path) if path is not None else None


def _finite_or_none(value: float) -> float | None:
    """JSON has no NaN: a non-finite measurement is logged as null."""
    return value if math.isfinite(value) else None


def _resolve_precision(config: TrainConfig, device: torch.device) -> str:
    """Replace ``auto`` in training.precision and dtype by what this device runs fastest (the run's
    config.yaml records the choice); returns the line to log."""
    choice = choose_precision(config.training.precision, config.dtype, device,
                              trains_base_weights=is_full_finetune(config.adapter))
    if config.update_rule.method in NO_LOSS_SCALER:
        choice = without_loss_scaler(choice, config.training.precision)
    config.training.precision = choice.precision
    config.dtype = choice.weights_dtype
    return choice.describe()


def _fuse_projections(model: nn.Module, training) -> str | None:
    """training.fused_projections: group the adapted projections that share an input (adapters/lora/fused.py)."""
    if training.fused_projections is False or (training.fused_projections == "auto" and training.compile):
        return None
    fused = fuse_projections(model, ADAPTER_NAME)
    return f"fused projections: {fused} adapted layers"


def check_objective_combinations(config: TrainConfig) -> None:
    """Preference and reward objectives need what only an adapter run has; say so before anything loads."""
    objective = config.training.objective
    if objective == "sft":
        return
    if is_full_finetune(config.adapter):
        raise ConfigError(f"training.objective={objective!r} needs an adapter: its reference model is the base with "
                          "the adapter switched off. Use adapter.method: lora (or another adapter), or objective: sft "
                          "for full finetuning.")
    if config.data.select is not None:
        raise ConfigError(f"data.select works on SFT examples; training.objective={objective!r} reads preference "
                          "records. Select the data first (`tuneforge select`) or remove data.select.")
    if objective == "grpo":  # a reward that cannot be found or compiled fails now, not after the model loads
        from tuneforge.train.objectives.rewards import resolve_reward

        resolve_reward(config.training.grpo_reward)


def check_eval_generate(config: TrainConfig) -> None:
    """``training.eval_generate`` needs held-out data; checked before anything loads."""
    if config.training.eval_generate and (eval_source(config) is None or config.data.eval_size == 0):
        raise ConfigError(
            f"training.eval_generate={config.training.eval_generate} needs held-out examples, but this config has "
            "none: set data.eval to a file in the training data's format (its final assistant turns are the gold "
            "answers), or set training.eval_generate=0."
        )


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


def _optimizer_step(model, rule: UpdateRule, scheduler, scaler, guard: NonFiniteGuard, data, state, config: TrainConfig,
                    strategy, hooks: HookChain, total_steps: int, objective: Objective) -> StepOutcome:
    training = config.training
    optimizer = rule.optimizer
    fetched = [_next_batch(data, state) for _ in range(training.grad_accum)]
    micro_batches = [strategy.to_device(strategy.my_rows(batch)) for batch, _ in fetched]
    tokens = sum(count for _, count in fetched)
    # Normalise by the units (SFT: labelled tokens; DPO: pairs) of the whole accumulated step, so
    # accumulation equals one big batch.
    labelled = sum(objective.units(b) for b in micro_batches)
    labelled = max(1, int(strategy.reduce_sum(labelled)))
    rule.begin_step(model, state.step)
    if rule.takes_whole_step:  # LOMO/AdaLomo: update inside backward; MeZO: two forwards, no backward
        return _whole_step(model, rule, scheduler, guard, micro_batches, labelled, tokens, state, training, objective)
    loss_sum = 0.0
    metric_sums: dict[str, float] = {}
    for index, batch in enumerate(micro_batches):
        last = index == len(micro_batches) - 1
        with strategy.sync_gradients(last):  # DDP: all-reduce once per step, in the last backward
            with autocast(training.precision, batch["input_ids"].device):
                batch_loss, metrics = strategy.forward(objective.loss_sum, model, batch)
            for key, value in metrics.items():
                metric_sums[key] = metric_sums.get(key, 0.0) + value
            loss = batch_loss / labelled
            extra = hooks.extra_loss(model)
            if extra is not None:
                loss = loss + extra / len(micro_batches)
            (scaler.scale(loss) if scaler is not None else loss).backward()
        loss_sum += float(batch_loss.detach())
    if scaler is not None:
        scaler.unscale_(optimizer)  # clip and measure the true gradients
    grad_norm = _clip_and_measure(optimizer, training.max_grad_norm)
    outcome = StepOutcome(strategy.reduce_sum(loss_sum) / labelled, grad_norm, tokens)  # tokens: the global batch's
    outcome.metrics = {key: strategy.reduce_sum(value) / labelled for key, value in metric_sums.items()}
    outcome.applied = guard.allows(outcome.loss, grad_norm, state.step + 1, scaler.get_scale() if scaler else None)
    if outcome.applied:
        hooks.before_optimizer_step(model, state.step, total_steps)
        scaler.step(optimizer) if scaler is not None else optimizer.step()
    if scaler is not None:
        scaler.update()  # halves the scale after an overflow, grows it after a run of good steps
    _advance_schedule(scheduler)
    optimizer.zero_grad(set_to_none=True)
    if outcome.applied:
        hooks.after_optimizer_step(model, state.step, total_steps)
    return outcome


def _whole_step(model, rule: UpdateRule, scheduler, guard: NonFiniteGuard, micro_batches, labelled: int, tokens: int,
                state, training, objective: Objective) -> StepOutcome:
    """A step the update rule takes itself, from the same loss the loop would use."""
    def loss_fn(batch):
        with autocast(training.precision, batch["input_ids"].device):
            batch_loss, _ = objective.loss_sum(model, batch)
        return batch_loss / labelled

    result = rule.whole_step(model, micro_batches, loss_fn, training.max_grad_norm, state.step)
    outcome = StepOutcome(result.loss, result.grad_norm, tokens)
    outcome.applied = guard.allows(result.loss, result.grad_norm, state.step + 1) and result.applied
    _advance_schedule(scheduler)
    return outcome


def _advance_schedule(scheduler) -> None:
    with warnings.catch_warnings():
        # A skipped step still advances the schedule, so the planned learning rates keep their steps.
        warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step\\(\\)` before")
        scheduler.step()


def _clip_and_measure(optimizer, max_grad_norm: float | None) -> float:
    """The total gradient norm before clipping (clipped to ``max_grad_norm`` when set)."""
    params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
    if not params:
        return 0.0
    if max_grad_norm is not None:
        return _whole_value(torch.nn.utils.clip_grad_norm_(params, max_grad_norm))
    return _whole_value(torch.nn.utils.get_total_norm([p.grad for p in params]))


def _whole_value(norm: torch.Tensor) -> float:
    """FSDP's gradients are DTensor shards: their norm is a replicated DTensor, computed across ranks."""
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)


def _evaluate_and_check_stop(model, tokenizer, data: PreparedData, config: TrainConfig, state: TrainState,
                             log: MetricsLog, progress, strategy, objective: Objective) -> bool:
    if not data.eval_batches:
        return False
    with eager_only():  # through the strategy: FSDP gathers the sharded weights for each layer
        eval_loss, eval_metrics = strategy.run(lambda m: objective.evaluate(m, data.eval_batches, strategy.device), model)
        accuracy = strategy.run(lambda m: _eval_exact_match(m, tokenizer, data, config, strategy.device), model)
    record = {"step": state.step, "eval_loss": eval_loss, **eval_metrics}
    line = f"step {state.step}: eval loss {eval_loss:.4f}"
    if objective.name == "sft":  # perplexity means something for a token cross-entropy only
        record["eval_perplexity"] = math.exp(min(eval_loss, 50))
        line += f" (perplexity {record['eval_perplexity']:.2f})"
    if "eval_preference_accuracy" in eval_metrics:
        line += f", preference accuracy {eval_metrics['eval_preference_accuracy']:.1%}"
    if "eval_kl" in eval_metrics:
        line += f", KL to reference {eval_metrics['eval_kl']:.4f}"
    if accuracy is not None:
        record.update(eval_exact_match=accuracy.exact_match, eval_contains=accuracy.contains, eval_generated=accuracy.n)
        line += f", exact match {accuracy.exact_match:.1%} of {accuracy.n}"
        progress.show_exact_match(accuracy.exact_match)
    log.log(record)
    state.history.append({key: value for key, value in record.items() if key != "eval_perplexity"})
    progress.note(line)
    if state.best_eval_loss is None or eval_loss < state.best_eval_loss:
        state.best_eval_loss = eval_loss
        state.evals_without_improvement = 0
        return False
    state.evals_without_improvement += 1
    patience = config.training.early_stopping_patience
    return patience is not None and state.evals_without_improvement >= patience


def _eval_exact_match(model, tokenizer, data: PreparedData, config: TrainConfig, device: torch.device):
    """Greedy answers to the first ``training.eval_generate`` eval examples, scored against their
    final assistant turns (None when off). Generation stops a few tokens past the longest gold
    answer: a longer reply cannot be an exact match."""
    examples = data.eval_examples[: config.training.eval_generate]
    if not examples:
        return None
    longest = max(len(tokenizer(gold_answer(e), add_special_tokens=False)["input_ids"]) for e in examples)
    with autocast(config.training.precision, device):
        return score_generation(model, tokenizer, examples, template=config.data.template,
                                max_new_tokens=longest + EXTRA_GENERATED_TOKENS,
                                batch_size=config.training.eval_batch_size, progress=False, num_samples=0)


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
