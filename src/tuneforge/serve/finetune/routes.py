"""The fine-tuning routes of `tuneforge serve`, in OpenAI's shapes (the `openai` client drives them).

    POST   /v1/files                             multipart: file (chat JSONL) + purpose=fine-tune
    GET    /v1/files   /v1/files/{id}            DELETE /v1/files/{id}
    POST   /v1/fine_tuning/jobs                  model, training_file, validation_file, suffix, seed,
                                                 hyperparameters | method.supervised.hyperparameters,
                                                 metadata (tuneforge extras: adapter_method, r, alpha)
    GET    /v1/fine_tuning/jobs[/{id}[/events|/checkpoints]]      POST /v1/fine_tuning/jobs/{id}/cancel

Every route needs the admin key when the server has one: a job changes what the server serves and
spends its compute. Errors keep OpenAI's shape; their status comes from the exception type.
"""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import FastAPI, Request
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from tuneforge.serve.finetune.files import parse_multipart
from tuneforge.serve.finetune.jobs import AUTO, FineTuningService, JobSpec, tuneforge_extras

MAX_METADATA_KEYS = 16  # OpenAI's bound on metadata pairs


class _Strict(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)


class Hyperparameters(_Strict):
    n_epochs: Annotated[int, Field(ge=1, le=50)] | Literal["auto"] = "auto"
    batch_size: Annotated[int, Field(ge=1, le=256)] | Literal["auto"] = "auto"
    learning_rate_multiplier: Annotated[float, Field(gt=0, le=10)] | Literal["auto"] = "auto"


class Supervised(_Strict):
    hyperparameters: Hyperparameters | None = None


class Method(_Strict):
    type: Literal["supervised"] = "supervised"
    supervised: Supervised | None = None


class JobBody(_Strict):
    model: str
    training_file: str
    validation_file: str | None = None
    suffix: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_-]{1,40}$")
    seed: int | None = Field(default=None, ge=0, le=2**31 - 1)
    hyperparameters: Hyperparameters | None = None
    method: Method | None = None
    metadata: dict[str, str] | None = Field(default=None, max_length=MAX_METADATA_KEYS)

    def spec(self) -> JobSpec:
        nested = self.method.supervised.hyperparameters if self.method and self.method.supervised else None
        hyper = nested or self.hyperparameters or Hyperparameters()
        chosen = {name: AUTO[name] if getattr(hyper, name) == "auto" else getattr(hyper, name) for name in AUTO}
        return JobSpec(model=self.model, training_file=self.training_file, validation_file=self.validation_file,
                       suffix=self.suffix, seed=self.seed if self.seed is not None else 42,
                       metadata=dict(self.metadata or {}), **chosen, **tuneforge_extras(self.metadata))


def add_finetune_routes(app: FastAPI, finetune: FineTuningService, admin_only: list) -> None:
    @app.post("/v1/files", dependencies=admin_only)
    async def upload_file(request: Request):
        body = await request.body()
        upload = await run_in_threadpool(parse_multipart, body, request.headers.get("content-type", ""))
        return await run_in_threadpool(finetune.files.add, upload)

    @app.get("/v1/files", dependencies=admin_only)
    def list_files():
        return {"object": "list", "data": finetune.files.list(), "has_more": False}

    @app.get("/v1/files/{file_id}", dependencies=admin_only)
    def get_file(file_id: str):
        return finetune.files.get(file_id)

    @app.delete("/v1/files/{file_id}", dependencies=admin_only)
    def delete_file(file_id: str):
        return finetune.files.delete(file_id)

    @app.post("/v1/fine_tuning/jobs", dependencies=admin_only)
    def create_job(body: JobBody):
        return finetune.create(body.spec())

    @app.get("/v1/fine_tuning/jobs", dependencies=admin_only)
    def list_jobs(after: str | None = None, limit: Annotated[int, Field(ge=1, le=100)] = 20):
        return finetune.list(after, limit)

    @app.get("/v1/fine_tuning/jobs/{job_id}", dependencies=admin_only)
    def get_job(job_id: str):
        return finetune.get(job_id)

    @app.get("/v1/fine_tuning/jobs/{job_id}/events", dependencies=admin_only)
    def job_events(job_id: str, after: str | None = None, limit: Annotated[int, Field(ge=1, le=100)] = 20):
        return finetune.events(job_id, after, limit)

    @app.get("/v1/fine_tuning/jobs/{job_id}/checkpoints", dependencies=admin_only)
    def job_checkpoints(job_id: str):
        return finetune.checkpoints(job_id)

    @app.post("/v1/fine_tuning/jobs/{job_id}/cancel", dependencies=admin_only)
    def cancel_job(job_id: str):
        return finetune.cancel(job_id)
