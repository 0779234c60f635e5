"""Fine-tuning jobs: records, events, a queue, and one worker that trains them one at a time.

    <state-dir>/jobs/<job-id>/job.json      the OpenAI job object (status, error, fine_tuned_model...)
    <state-dir>/jobs/<job-id>/events.json   its events, oldest first
    <state-dir>/jobs/<job-id>/run/          the training run directory (config, metrics, adapter)
    <state-dir>/models/<fine_tuned_model>/  the finished adapter, served under that name at once

    queued --worker--> running --> succeeded | failed | cancelled        (queued --cancel--> cancelled)

A job trains with `tuneforge.train.train` (the same loop `tuneforge train` runs) on the model the
engine serves: one copy of the base weights. The job's adapter is added next to the served ones and
trained alone (`set_trainable_adapter`); the engine's rows name their own adapters, so the job's is
never applied to a served row, and no base weight has `requires_grad`. Training and decoding take
turns on the engine's step lock (`coserve.TrainingTurns`). Every record is written atomically; on a
restart, queued jobs queue again and a job that was running fails with a message saying so.
"""

from __future__ import annotations

import errno
import json
import logging
import math
import queue
import re
import shutil
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from tuneforge.adapters.model import adapter_names, delete_adapter, set_active_adapters, set_trainable_adapter
from tuneforge.errors import ConfigError, TuneforgeError
from tuneforge.fileio import atomic_write_json
from tuneforge.serve.finetune.coserve import CoservePolicy, TrainingTurns
from tuneforge.serve.finetune.files import FileStore

log = logging.getLogger("tuneforge.serve.finetune")

TRAINING_ADAPTER = "default"  # the name `tuneforge.train.train` gives the adapter it trains
JOB_METHODS = ("lora", "lora-fa", "dora")  # per-layer methods whose adapters the engine serves per row
TERMINAL = ("succeeded", "failed", "cancelled")
SUFFIX_PATTERN = re.compile(r"[A-Za-z0-9_-]{1,40}")
JOB_ID = re.compile(r"ftjob-[0-9a-f]{24}")
BASE_LEARNING_RATE = 2e-4  # learning_rate_multiplier scales this (TrainingConfig's default lr)
AUTO = {"n_epochs": 3, "batch_size": 4, "learning_rate_multiplier": 1.0}


class UnknownJobError(TuneforgeError):
    """No fine-tuning job with that id."""


class JobConflictError(TuneforgeError):
    """The request conflicts with a job's state (cancelling a finished job, a suffix already taken)."""


class UnknownBaseModelError(TuneforgeError):
    """The job names a base model this server does not serve."""


class JobCancelled(Exception):
    """Raised from the training loop's step callback to end a cancelled job (not a KeyboardInterrupt,
    which the loop would answer by saving a checkpoint and returning normally)."""


@dataclass(frozen=True)
class JobSpec:
    """A job as validated on creation; everything the worker needs to train it."""

    model: str
    training_file: str
    validation_file: str | None
    suffix: str | None
    n_epochs: int
    batch_size: int
    learning_rate_multiplier: float
    seed: int
    method: str = "lora"
    r: int = 8
    alpha: float = 16.0
    metadata: dict[str, str] = field(default_factory=dict)


def tuneforge_extras(metadata: dict[str, str] | None) -> dict:
    """Adapter settings from the job's metadata: `adapter_method`, `r`, `alpha` (OpenAI metadata
    values are strings, so the numbers arrive as text)."""
    metadata = metadata or {}
    extras: dict = {}
    method = metadata.get("adapter_method", "lora")
    if method not in JOB_METHODS:
        raise ConfigError(f"metadata.adapter_method={method!r} cannot be trained as a served job; choose one of "
                          f"{list(JOB_METHODS)} (other methods: tuneforge train, then serve the adapter)")
    extras["method"] = method
    for key, kind, low, high in (("r", int, 1, 256), ("alpha", float, 1e-6, 4096.0)):
        if key not in metadata:
            continue
        try:
            value = kind(metadata[key])
        except ValueError:
            raise ConfigError(f"metadata.{key}={metadata[key]!r} must be a number") from None
        if not low <= value <= high:
            raise ConfigError(f"metadata.{key}={value} must be in [{low}, {high}]")
        extras[key] = value
    return extras


class FineTuningService:
    """The job side of the server: create, list, cancel, and the worker thread that trains."""

    def __init__(self, state_dir: str | Path, engine, adapters, base_model_name: str,
                 policy: CoservePolicy | None = None):
        self.state_dir = Path(state_dir)
        self.jobs_dir = self.state_dir / "jobs"
        self.models_dir = self.state_dir / "models"
        for directory in (self.jobs_dir, self.models_dir):
            directory.mkdir(parents=True, exist_ok=True)
        self.files = FileStore(self.state_dir / "files")
        self.engine, self.adapters, self.base_model_name = engine, adapters, base_model_name
        self.policy = policy or CoservePolicy()
        adapters.add_directory(self.models_dir)
        self._lock = threading.Lock()
        self._save_lock = threading.Lock()  # records reach the disk in the order they changed
        self._stopping = False
        self._jobs: dict[str, dict] = {}
        self._events: dict[str, list[dict]] = {}
        self._cancel: set[str] = set()
        self._waited: dict[str, float] = {}  # per job: seconds its training waited for decoding
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._recover()

    # ---- API ------------------------------------------------------------------------------------

    def create(self, spec: JobSpec) -> dict:
        if spec.model != self.base_model_name:
            raise UnknownBaseModelError(f"model '{spec.model}' is not served here; jobs fine-tune the served base "
                                        f"model '{self.base_model_name}'")
        self.files.get(spec.training_file)
        if spec.validation_file is not None:
            self.files.get(spec.validation_file)
        job_id = f"ftjob-{uuid.uuid4().hex[:24]}"
        name = f"ft-{spec.suffix or job_id[-12:]}"
        with self._lock:
            self._check_name_free(name, spec.suffix)
            job = {
                "id": job_id, "object": "fine_tuning.job", "created_at": int(time.time()), "model": spec.model,
                "training_file": spec.training_file, "validation_file": spec.validation_file,
                "hyperparameters": {"n_epochs": spec.n_epochs, "batch_size": spec.batch_size,
                                    "learning_rate_multiplier": spec.learning_rate_multiplier},
                "method": {"type": "supervised", "supervised": {"hyperparameters": {
                    "n_epochs": spec.n_epochs, "batch_size": spec.batch_size,
                    "learning_rate_multiplier": spec.learning_rate_multiplier}}},
                "metadata": spec.metadata or None, "seed": spec.seed, "suffix": spec.suffix, "status": "queued",
                "fine_tuned_model": None, "finished_at": None, "error": None, "organization_id": "tuneforge",
                "result_files": [], "trained_tokens": None, "estimated_finish": None, "integrations": [],
                "tuneforge": {"adapter_method": spec.method, "r": spec.r, "alpha": spec.alpha, "planned_name": name},
            }
            self._jobs[job_id] = job
            self._events[job_id] = []
        self._event(job_id, f"Created fine-tuning job: {job_id}")
        self._event(job_id, "Job queued" + (" behind a running job" if self._busy() else ""))
        self._save(job_id)
        self._queue.put(job_id)
        return dict(job)

    def get(self, job_id: str) -> dict:
        with self._lock:
            job = self._jobs.get(job_id)
            if job is None:
                raise UnknownJobError(f"no fine-tuning job with id {job_id!r}; list them with GET /v1/fine_tuning/jobs")
            return dict(job)

    def list(self, after: str | None = None, limit: int = 20) -> dict:
        with self._lock:
            jobs = sorted(self._jobs.values(), key=lambda job: job["created_at"], reverse=True)
        if after is not None:
            ids = [job["id"] for job in jobs]
            jobs = jobs[ids.index(after) + 1:] if after in ids else []
        return {"object": "list", "data": [dict(job) for job in jobs[:limit]], "has_more": len(jobs) > limit}

    def events(self, job_id: str, after: str | None = None, limit: int = 20) -> dict:
        self.get(job_id)
        with self._lock:
            events = list(reversed(self._events[job_id]))  # newest first, as OpenAI lists them
        if after is not None:
            ids = [event["id"] for event in events]
            events = events[ids.index(after) + 1:] if after in ids else []
        return {"object": "list", "data": events[:limit], "has_more": len(events) > limit}

    def checkpoints(self, job_id: str) -> dict:
        job = self.get(job_id)
        data = []
        if job["status"] == "succeeded":
            summary = job["tuneforge"].get("summary", {})
            data.append({"object": "fine_tuning.job.checkpoint", "id": f"ftckpt-{job_id[-24:]}",
                         "created_at": job["finished_at"], "fine_tuned_model_checkpoint": job["fine_tuned_model"],
                         "fine_tuning_job_id": job_id, "step_number": summary.get("steps", 0),
                         "metrics": {"step": summary.get("steps", 0), "train_loss": summary.get("final_train_loss")}})
        return {"object": "list", "data": data, "has_more": False, "first_id": data[0]["id"] if data else None,
                "last_id": data[-1]["id"] if data else None}

    def cancel(self, job_id: str) -> dict:
        with self._lock:
            job = self._jobs.get(job_id)
            if job is None:
                raise UnknownJobError(f"no fine-tuning job with id {job_id!r}")
            if job["status"] in TERMINAL:
                raise JobConflictError(f"job {job_id} has already {job['status']}; only queued or running jobs "
                                       "can be cancelled")
            self._cancel.add(job_id)
            if job["status"] == "queued":  # the worker skips it when its turn comes
                self._finish(job, "cancelled")
        self._event(job_id, "Job cancellation requested")
        self._save(job_id)
        return self.get(job_id)

    # ---- the worker -----------------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._work, name="tuneforge-finetune", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """Stop the worker; a running job is cancelled (its record says the server stopped)."""
        with self._lock:
            self._stopping = True
            self._cancel.update(job_id for job_id, job in self._jobs.items() if job["status"] == "running")
        self._queue.put(None)
        if self._thread is not None:
            self._thread.join(60)
            self._thread = None

    def _work(self) -> None:
        while True:
            job_id = self._queue.get()
            if job_id is None:
                return
            with self._lock:
                runnable = self._jobs[job_id]["status"] == "queued"
            if runnable:
                self._run(job_id)

    def _run(self, job_id: str) -> None:
        with self._lock:
            job = self._jobs[job_id]
            job["status"] = "running"
        self._event(job_id, "Fine-tuning job started")
        self._save(job_id)
        try:
            summary = self._train(job_id, job)
            name = job["tuneforge"]["planned_name"]
            self._publish_adapter(summary.adapter_dir, name)
        except JobCancelled:
            shutil.rmtree(self.jobs_dir / job_id / "run", ignore_errors=True)  # cancelling frees the disk too
            with self._lock:
                if self._stopping:
                    self._finish(job, "failed", {"code": "server_stopped", "param": None,
                                                 "message": "the server stopped while this job ran; create it again"})
                else:
                    self._finish(job, "cancelled")
            self._event(job_id, "Job cancelled" if job["status"] == "cancelled" else "Job stopped with the server")
        except Exception as error:
            with self._lock:
                self._finish(job, "failed", error=job_error(error, job_id))
            self._event(job_id, f"Job failed: {job['error']['message']}", level="error")
        else:
            trained_tokens = _tokens_seen(summary.run_dir)
            with self._lock:
                job["fine_tuned_model"] = name
                job["trained_tokens"] = trained_tokens
                final_loss = summary.final_train_loss
                job["tuneforge"]["summary"] = {"steps": summary.steps,
                                               "final_train_loss": final_loss if final_loss is None
                                               or math.isfinite(final_loss) else None,
                                               "train_seconds": summary.train_seconds,
                                               "seconds_given_to_decoding": self._waited.pop(job_id, 0.0)}
                self._finish(job, "succeeded")
            self._event(job_id, f"New fine-tuned model created: {name}")
            self._event(job_id, "The job has successfully completed")
        self._save(job_id)

    def _train(self, job_id: str, job: dict):
        from tuneforge.config.schema import TrainConfig
        from tuneforge.train import train

        spec = job["tuneforge"]
        hyper = job["hyperparameters"]
        config = TrainConfig.model_validate({
            "model": self.base_model_name, "device": str(self.engine.device),
            "output_dir": str(self.jobs_dir / job_id / "run"),
            "adapter": {"method": spec["adapter_method"], "r": spec["r"], "alpha": spec["alpha"]},
            # The server's own prompt format ("auto"), so the model learns the turns it will be served with.
            "data": {"train": str(self.files.data_path(job["training_file"])), "format": "messages",
                     "template": "auto", "max_seq_len": min(512, self.engine.max_model_len),
                     "packing": False,  # batch_size counts examples, as in OpenAI's API
                     "eval": str(self.files.data_path(job["validation_file"])) if job["validation_file"] else None},
            "training": {"epochs": hyper["n_epochs"], "batch_size": hyper["batch_size"],
                         "lr": BASE_LEARNING_RATE * hyper["learning_rate_multiplier"], "seed": job["seed"],
                         "log_every": 1, "warmup_ratio": 0.0},
        })
        model, engine = self.engine.model, self.engine
        layers_listed = False

        def to_serving() -> None:
            nonlocal layers_listed
            model.eval()
            if TRAINING_ADAPTER in adapter_names(model):
                set_active_adapters(model, [])
            if not layers_listed:  # the job wrapped new layers: the engine must list them (row_adapters)
                self.adapters.version += 1
                layers_listed = True

        def to_training() -> None:
            if TRAINING_ADAPTER in adapter_names(model):
                set_active_adapters(model, [TRAINING_ADAPTER])
                set_trainable_adapter(model, TRAINING_ADAPTER)  # loading a served adapter freezes every other one
                model.train()

        turns = TrainingTurns(engine.lock, self.policy,
                              lambda: (engine.scheduler.queue_depth, len(engine.scheduler.running)),
                              on_release=to_serving, on_acquire=to_training,
                              should_stop=lambda: job_id in self._cancel, yield_requested=engine.step_aside)

        def on_step(step: int, loss: float) -> None:
            if math.isfinite(loss):
                self._event(job_id, f"Step {step}: training loss={loss:.4f}", data={"step": step, "train_loss": loss},
                            kind="metrics")
            else:  # JSON has no NaN; the loop skipped this update (its non-finite guard)
                self._event(job_id, f"Step {step}: non-finite loss, update skipped", level="warn",
                            data={"step": step, "train_loss": None}, kind="metrics")
            if job_id in self._cancel:
                raise JobCancelled()
            turns.between_steps()
            if job_id in self._cancel:
                raise JobCancelled()

        if TRAINING_ADAPTER in adapter_names(model):
            raise ConfigError(f"the served model already holds an adapter named '{TRAINING_ADAPTER}', the name "
                              "tuneforge's training loop trains under; unload it and create the job again")
        turns.enter()
        try:
            return train(config, model_and_tokenizer=(model, engine.tokenizer), on_step=on_step)
        finally:
            self._waited[job_id] = turns.waited_total
            try:  # whatever happened, the job's adapter leaves the served model
                if TRAINING_ADAPTER in adapter_names(model):
                    delete_adapter(model, TRAINING_ADAPTER)
                model.eval()
                self.adapters.version += 1
            finally:
                turns.leave()

    def _publish_adapter(self, adapter_dir: Path, name: str) -> None:
        """Copy the adapter to models/<name> whole: a copy beside it, then one rename."""
        staging = self.models_dir / f".{name}.staging"
        shutil.rmtree(staging, ignore_errors=True)
        try:
            shutil.copytree(adapter_dir, staging)
            staging.rename(self.models_dir / name)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise

    # ---- records --------------------------------------------------------------------------------

    def _check_name_free(self, name: str, suffix: str | None) -> None:
        taken_by = [job["id"] for job in self._jobs.values()
                    if job["tuneforge"]["planned_name"] == name and job["status"] not in ("failed", "cancelled")]
        if taken_by or self.adapters.knows(name):
            holder = f"job {taken_by[0]}" if taken_by else "an adapter already served"
            raise JobConflictError(f"suffix {suffix!r} gives the model name '{name}', which {holder} holds; "
                                   "pick another suffix")

    def _busy(self) -> bool:
        with self._lock:
            return any(job["status"] == "running" for job in self._jobs.values())

    def _finish(self, job: dict, status: str, error: dict | None = None) -> None:
        job["status"], job["error"], job["finished_at"] = status, error, int(time.time())
        self._cancel.discard(job["id"])

    def _event(self, job_id: str, message: str, *, level: str = "info", data: dict | None = None,
               kind: str = "message") -> None:
        with self._lock:
            events = self._events[job_id]
            events.append({"object": "fine_tuning.job.event", "id": f"ftevent-{job_id[-12:]}-{len(events) + 1}",
                           "created_at": int(time.time()), "level": level, "message": message, "data": data or {},
                           "type": kind})
        self._save(job_id)

    def _save(self, job_id: str) -> None:
        """Write the job and its events atomically; a full disk is logged, the server keeps the job in memory."""
        with self._save_lock:
            with self._lock:
                job, events = json.loads(json.dumps(self._jobs[job_id])), list(self._events[job_id])
            try:
                atomic_write_json(self.jobs_dir / job_id / "events.json", events)
                atomic_write_json(self.jobs_dir / job_id / "job.json", job)
            except OSError as error:
                log.error("could not save fine-tuning job %s: %s", job_id, error)

    def _recover(self) -> None:
        """Jobs of an earlier run of the server: queued ones queue again, running ones failed."""
        for path in sorted(self.jobs_dir.glob("ftjob-*/job.json")):
            try:
                job = json.loads(path.read_text(encoding="utf-8"))
                events = json.loads((path.parent / "events.json").read_text(encoding="utf-8"))
            except (OSError, ValueError) as error:
                log.error("skipping unreadable fine-tuning job record %s: %s", path.parent.name, error)
                continue
            if not JOB_ID.fullmatch(str(job.get("id"))) or job["id"] != path.parent.name:
                continue
            self._jobs[job["id"]], self._events[job["id"]] = job, events
            if job["status"] == "running":
                self._finish(job, "failed", {"code": "server_restarted", "param": None,
                                             "message": "the server stopped while this job was running; create it again"})
                self._save(job["id"])
            elif job["status"] == "queued":
                self._queue.put(job["id"])


def _tokens_seen(run_dir: Path) -> int | None:
    """Training tokens of a finished run: the last `tokens_seen` of its metrics.jsonl."""
    try:
        lines = (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
        seen = [json.loads(line)["tokens_seen"] for line in lines if '"tokens_seen"' in line]
    except (OSError, ValueError, KeyError):
        return None
    return int(seen[-1]) if seen else None


def _disk_full(error: BaseException | None) -> bool:
    """ENOSPC anywhere in the chain (the training loop re-raises a failed save as a CheckpointError)."""
    seen = 0
    while error is not None and seen < 16:
        if isinstance(error, OSError) and error.errno == errno.ENOSPC:
            return True
        error, seen = error.__cause__ or error.__context__, seen + 1
    return False


def job_error(error: BaseException, job_id: str) -> dict:
    """The job's `error` object: what went wrong, in words a client can act on."""
    if _disk_full(error):
        return {"code": "disk_full", "param": None,
                "message": "the disk holding the server's state directory is full; free space and create the job again"}
    if isinstance(error, TuneforgeError):
        return {"code": "invalid_training_setup", "param": None, "message": str(error)}
    log.error("fine-tuning job %s failed", job_id, exc_info=error)
    return {"code": "internal_error", "param": None,
            "message": f"the job failed with an internal error (the server log has it under {job_id})"}
