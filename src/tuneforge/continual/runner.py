"""``tuneforge continual``: train a stream of tasks in order and measure what each task costs the others.

    report = run_continual(config_dict, source="cfg.yaml")

Every check (the config, the method's options, each task's data and gold answers, the probe) runs
before the model loads. Then: score the untouched base on every task (the FWT baseline), and for
each stage train one ordinary run with ``train.train`` in ``<output_dir>/stages/NN-<task>/``, score
every task (trained and still to come) to fill R's row, record the probe loss, and save the
stream's progress and the method's state. ``--resume`` skips finished stages and continues the
stage in progress from its own last checkpoint, exactly as ``tuneforge train --resume`` does.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import torch
import yaml

from tuneforge.adapters.peft_format import load_adapter
from tuneforge.config.schema import TrainConfig
from tuneforge.continual.config import ContinualConfig, parse_continual_config
from tuneforge.continual.methods import Stage, StreamContext, build_method
from tuneforge.continual.methods.base import ADAPTER_NAME, ContinualMethod, copy_of
from tuneforge.continual.probe import load_probe, probe_loss
from tuneforge.continual.report import write_report
from tuneforge.continual.tasks import Task, load_tasks, write_jsonl
from tuneforge.errors import ConfigError, TuneforgeError
from tuneforge.eval.generation import score_generation
from tuneforge.fileio import atomic_write, atomic_write_json, atomic_write_text
from tuneforge.train import train
from tuneforge.train.checkpoint import latest_checkpoint
from tuneforge.train.run_dir import earlier_run_contents
from tuneforge.train.strategy import resolve_device

PROGRESS = "progress.json"
STREAM_CONFIG = "continual.yaml"
METHOD_STATE = "method_state.pt"


class StreamInterrupted(TuneforgeError):
    """A stage stopped early (Ctrl-C); its checkpoint is saved and --resume continues it."""


def run_continual(raw: dict, *, source: str = "config", resume: bool = False, overwrite: bool = False,
                  model_and_tokenizer=None, on_step: Callable[[int, float], None] | None = None,
                  say: Callable[[str], None] = print) -> dict:
    config, train_config = parse_continual_config(raw, source)
    run_dir = Path(config.output_dir).expanduser()
    tasks = load_tasks(config)
    context = StreamContext(run_dir, tasks, train_config, config.seed)
    method = build_method(config.method, context)
    probe_name, probe = load_probe(config.probe)
    progress = _start_progress(run_dir, raw, config, method, tasks, probe_name, resume, overwrite)
    base, tokenizer = model_and_tokenizer or _load_base(train_config)
    device = resolve_device(train_config.device)
    base.to(device)
    if overwrite and not resume and run_dir.exists():
        shutil.rmtree(run_dir)  # everything loaded: only now may the earlier stream go
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / STREAM_CONFIG, yaml.safe_dump(raw, sort_keys=False))
    pristine = copy_of(base)
    context.fresh_base = lambda: copy_of(pristine)
    context.tokenizer = tokenizer
    scorer = _Scorer(config, train_config, tasks, probe, tokenizer)
    if progress.get("baseline") is None:
        say("scoring the base model on every task")
        progress["baseline"] = scorer.score(base)
        _save_progress(run_dir, progress)
    del base
    stages = _plan_stages(method, run_dir, tasks)
    _restore_method(method, stages, progress, run_dir)
    for stage in stages[len(progress["stages"]):]:
        names = "+".join(tasks[t].name for t in stage.tasks)
        say(f"stage {stage.index + 1}/{len(stages)}: training {names} ({method.name})")
        model = _train_stage(method, stage, context, tokenizer, on_step)
        method.after_task(stage, model, tokenizer)
        with method.evaluation_model(stage, model, tokenizer) as evaluated:
            row = scorer.score(evaluated)
        method.stage_finished(stage)
        atomic_write(stage.run_dir / METHOD_STATE, lambda tmp: torch.save(method.state_dict(), tmp))
        progress["stages"].append({"tasks": list(stage.tasks), "run_dir": str(stage.run_dir), **row})
        _save_progress(run_dir, progress)
        write_report(run_dir, progress, plots=False)
        say(f"  accuracy: " + ", ".join(f"{t.name} {100 * a:.1f}%" for t, a in zip(tasks, row["accuracy"]))
            + f"; probe loss {row['probe_loss']:.4f}")
        del model
    return write_report(run_dir, progress)


class _Scorer:
    """One row of R (exact match on every task's test set) and the probe loss, for one model."""

    def __init__(self, config: ContinualConfig, train_config: TrainConfig, tasks: list[Task], probe, tokenizer):
        self.config, self.train_config, self.tasks, self.probe, self.tokenizer = config, train_config, tasks, probe, tokenizer

    def score(self, model) -> dict:
        data = self.train_config.data
        accuracy = [score_generation(model, self.tokenizer, task.test, template=data.template,
                                     max_new_tokens=self.config.max_new_tokens,
                                     batch_size=self.train_config.training.eval_batch_size, progress=False).exact_match
                    for task in self.tasks]
        loss = probe_loss(model, self.tokenizer, self.probe, template=data.template, max_seq_len=data.max_seq_len,
                          precision=self.train_config.training.precision,
                          batch_size=self.train_config.training.eval_batch_size)
        return {"accuracy": accuracy, "probe_loss": loss}


def _plan_stages(method: ContinualMethod, run_dir: Path, tasks: list[Task]) -> list[Stage]:
    stages = []
    for index, members in enumerate(method.stage_tasks()):
        label = "joint" if len(members) > 1 else tasks[members[0]].name
        stages.append(Stage(index, tuple(members), run_dir / "stages" / f"{index + 1:02d}-{label}"))
    return stages


def _train_stage(method: ContinualMethod, stage: Stage, context: StreamContext, tokenizer, on_step) -> torch.nn.Module:
    """The stage's trained model: trained now, continued from its last checkpoint, or (training had
    finished before a crash) rebuilt from its saved adapter."""
    data_file = write_jsonl(method.training_examples(stage), stage.run_dir / "train.jsonl")
    model = method.training_model(stage, context.fresh_base())
    config = _stage_config(context.train_config, stage, data_file, method.init_adapter(stage))
    if (stage.run_dir / "summary.json").is_file() and stage.adapter_dir.is_dir():
        load_adapter(model, stage.adapter_dir, ADAPTER_NAME, trainable=True)  # after_task may need its gradients
        return model
    resume = latest_checkpoint(stage.run_dir) is not None
    overwrite = not resume and bool(earlier_run_contents(stage.run_dir))  # started, but no checkpoint yet
    summary = train(config, resume=resume, overwrite=overwrite, model_and_tokenizer=(model, tokenizer), on_step=on_step,
                    prepare_adapter=lambda m: method.prepare_adapter(stage, m),
                    extra_hooks=lambda m: method.training_hooks(stage, m))
    if summary.interrupted:
        raise StreamInterrupted(f"Stage {stage.index + 1} ({stage.run_dir.name}) was interrupted; its checkpoint is "
                                "saved. Continue the stream with `tuneforge continual CONFIG --resume`.")
    return model


def _stage_config(base: TrainConfig, stage: Stage, data_file: Path, init_adapter: Path | None) -> TrainConfig:
    config = base.model_copy(deep=True)
    config.output_dir = str(stage.run_dir)
    config.data.train = str(data_file)
    config.data.eval = None
    config.data.eval_size = 0  # the stream scores every task itself after the stage
    config.data.options = {}
    config.training.init_adapter = str(init_adapter) if init_adapter is not None else None
    if config.training.max_steps is not None:  # joint training gets the budget of all its tasks
        config.training.max_steps *= len(stage.tasks)
    return config


def _start_progress(run_dir: Path, raw: dict, config: ContinualConfig, method: ContinualMethod, tasks: list[Task],
                    probe_name: str, resume: bool, overwrite: bool) -> dict:
    fresh = {"method": method.name, "tasks": [task.name for task in tasks], "stages": [], "baseline": None,
             "planned_stages": len(method.stage_tasks()), "probe_name": probe_name}
    progress_file = run_dir / PROGRESS
    if not resume:
        if run_dir.exists() and any(run_dir.iterdir()) and not overwrite:
            raise ConfigError(f"output_dir {run_dir} already holds a stream. Continue it with --resume, pick another "
                              "output_dir, or pass --overwrite to replace it.")
        return fresh
    saved_config = run_dir / STREAM_CONFIG
    if saved_config.is_file():
        saved = yaml.safe_load(saved_config.read_text(encoding="utf-8"))
        if saved != raw:
            raise ConfigError(f"--resume: the config differs from the one {run_dir} was started with ({saved_config}); "
                              "resume with that config or start a new output_dir.")
    if not progress_file.is_file():
        return fresh
    import json

    return json.loads(progress_file.read_text(encoding="utf-8"))


def _restore_method(method: ContinualMethod, stages: list[Stage], progress: dict, run_dir: Path) -> None:
    """Replay the finished stages' bookkeeping and load the method's state after the last of them."""
    done = len(progress["stages"])
    for stage in stages[:done]:
        method.stage_finished(stage)
    if done:
        state_file = stages[done - 1].run_dir / METHOD_STATE
        method.load_state_dict(torch.load(state_file, weights_only=True))


def _save_progress(run_dir: Path, progress: dict) -> None:
    atomic_write_json(run_dir / PROGRESS, progress)


def _load_base(config: TrainConfig):
    from tuneforge.models import load_model

    loaded = load_model(config.model, dtype=config.dtype, device="cpu")
    return loaded.model, loaded.tokenizer
