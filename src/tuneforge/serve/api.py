"""The OpenAI-compatible HTTP API over the engine (FastAPI).

    GET  /v1/models              the base model and every adapter (with `parent`: the base)
    POST /v1/completions         prompt text (or token ids) -> text; `stream: true` for SSE chunks
    POST /v1/chat/completions    messages -> reply, rendered with the tokenizer's chat template
    POST /v1/adapters/load       {"name", "pin"?}     POST /v1/adapters/unload   {"name"}   (admin key)
    /v1/files, /v1/fine_tuning/jobs...  with a state directory: fine-tuning jobs (serve/finetune/, admin key)
    GET  /health (always open)   GET /metrics (Prometheus text)   GET /docs, /openapi.json

With an API key set, every route but /health needs `Authorization: Bearer <key>`; the adapter
routes (which change what every user is served) need the admin key, which defaults to the API key.
The admin key also works wherever the API key does.

The `model` field picks the adapter: the base model's name means no adapter. Errors keep OpenAI's
shape, {"error": {"message", "type", "param", "code"}}, and their status comes from the exception
type alone (`ERROR_STATUS`), never from the message text.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Literal

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from tuneforge.data import Message
from tuneforge.errors import AdapterError, ConfigError, DataError, TuneforgeError
from tuneforge.eval.generation import PromptFormat
from tuneforge.serve.adapters import AdapterCapacityError, AdapterManager, InvalidAdapterNameError, UnknownAdapterError
from tuneforge.serve.engine import (
    Completion,
    Delta,
    Engine,
    EngineStoppedError,
    EngineTimeoutError,
    GenerationFailedError,
    GenerationRequest,
    RequestError,
)
from tuneforge.serve.finetune.files import InvalidUploadError, UnknownFileError
from tuneforge.serve.finetune.jobs import JobConflictError, UnknownBaseModelError, UnknownJobError
from tuneforge.serve.guard import RequestGuard, ServeLimits, log
from tuneforge.serve.metrics import prometheus_text
from tuneforge.serve.sampling import SamplingParams
from tuneforge.serve.scheduler import QueueFullError

DEFAULT_CHAT_MAX_TOKENS = 256


class ApiError(Exception):
    def __init__(self, status: int, message: str, error_type: str, code: str | None = None, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.error_type, self.code, self.param = status, message, error_type, code, param


# Most specific first: the first matching type decides (status, OpenAI error type, code).
ERROR_STATUS: list[tuple[type[BaseException], int, str, str]] = [
    (UnknownAdapterError, 404, "invalid_request_error", "model_not_found"),
    (UnknownBaseModelError, 404, "invalid_request_error", "model_not_found"),
    (UnknownFileError, 404, "invalid_request_error", "file_not_found"),
    (UnknownJobError, 404, "invalid_request_error", "job_not_found"),
    (JobConflictError, 409, "invalid_request_error", "conflict"),
    (InvalidUploadError, 400, "invalid_request_error", "invalid_file"),
    (InvalidAdapterNameError, 400, "invalid_request_error", "invalid_model_name"),
    (QueueFullError, 429, "rate_limit_error", "queue_full"),
    (AdapterCapacityError, 503, "server_error", "adapters_busy"),
    (EngineTimeoutError, 503, "server_error", "timeout"),
    (EngineStoppedError, 503, "server_error", "engine_unavailable"),
    (GenerationFailedError, 500, "server_error", "generation_failed"),
    (RequestError, 400, "invalid_request_error", "invalid_request"),
    (ConfigError, 400, "invalid_request_error", "invalid_value"),
    (DataError, 400, "invalid_request_error", "invalid_value"),
    (AdapterError, 400, "invalid_request_error", "invalid_adapter"),
    (TuneforgeError, 400, "invalid_request_error", None),
]


def api_error_for(error: BaseException) -> ApiError:
    if isinstance(error, ApiError):
        return error
    for kind, status, error_type, code in ERROR_STATUS:
        if isinstance(error, kind):
            return ApiError(status, str(error), error_type, code)
    log.error("unexpected error while answering", exc_info=error)  # the traceback stays in the server log
    return ApiError(500, "internal server error; the server log has the details", "server_error", "internal_error")


def error_body(error: ApiError) -> dict:
    return {"error": {"message": error.message, "type": error.error_type, "param": error.param, "code": error.code}}


# ---- request bodies ---------------------------------------------------------------------------


# Bounds on every number a client sends, so that no value reaches torch or Python arithmetic unchecked
# (a seed of 2**64 used to escape as a bare 500). The engine checks the context length on top.
MAX_TOKENS_BOUND = 1 << 20
MAX_TEMPERATURE = 100.0
SEED_RANGE = (-(1 << 63), (1 << 64) - 1)  # what torch.Generator.manual_seed accepts


class _Strict(BaseModel):
    # NaN and infinity are not numbers a client may send (Python's JSON parser accepts them).
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)


class StreamOptions(_Strict):
    include_usage: bool = False  # a last chunk with the token counts


class _Body(_Strict):
    model: str
    max_tokens: int | None = Field(default=None, ge=1, le=MAX_TOKENS_BOUND)
    temperature: float = Field(default=1.0, ge=0, le=MAX_TEMPERATURE)
    top_p: float = Field(default=1.0, gt=0, le=1)
    top_k: int = Field(default=0, ge=0, le=MAX_TOKENS_BOUND)
    seed: int | None = Field(default=None, ge=SEED_RANGE[0], le=SEED_RANGE[1])
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(default=1, ge=1, le=1)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    @property
    def stop_strings(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class CompletionBody(_Body):
    prompt: str | list[int]
    logprobs: int | None = Field(default=None, ge=0, le=5)
    echo: Literal[False] = False


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessageBody(_Strict):
    role: Literal["system", "user", "assistant"]
    content: str | list[TextPart]

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatBody(_Body):
    messages: list[ChatMessageBody] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=MAX_TOKENS_BOUND)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=5)


class AdapterBody(BaseModel):
    name: str
    pin: bool = False


# ---- the service ------------------------------------------------------------------------------


@dataclass
class Service:
    engine: Engine
    adapters: AdapterManager | None
    model_name: str
    api_key: str | None = None
    request_timeout: float = 600.0
    limits: ServeLimits = ServeLimits()
    started: float = 0.0

    def __post_init__(self):
        self.started = time.time()
        self.prompt_format = PromptFormat.for_tokenizer("auto", self.engine.tokenizer)

    def check_limits(self, body: _Body, prompt_chars: int) -> None:
        """Refuse what would cost more than it can be worth, before any rendering or tokenizing."""
        limits, stops = self.limits, body.stop_strings
        if len(stops) > limits.max_stop_strings:
            raise ApiError(400, f"stop holds {len(stops)} strings; at most {limits.max_stop_strings} are allowed",
                           "invalid_request_error", "invalid_value", "stop")
        if any(len(stop) > limits.max_stop_chars for stop in stops):
            raise ApiError(400, f"each stop string may have at most {limits.max_stop_chars} characters",
                           "invalid_request_error", "invalid_value", "stop")
        if isinstance(body, ChatBody) and len(body.messages) > limits.max_messages:
            raise ApiError(400, f"messages holds {len(body.messages)} messages; this server takes at most "
                           f"{limits.max_messages} (--max-messages)", "invalid_request_error", "invalid_value", "messages")
        most = limits.prompt_chars(self.engine.max_model_len)
        if prompt_chars > most:
            raise ApiError(400, f"the prompt has {prompt_chars} characters, more than this server's {most} "
                           f"(--max-prompt-chars); it could not fit the {self.engine.max_model_len}-token context",
                           "invalid_request_error", "context_length_exceeded",
                           "messages" if isinstance(body, ChatBody) else "prompt")

    def adapter_for(self, model: str) -> str | None:
        if model == self.model_name:
            return None
        if self.adapters is None:
            raise UnknownAdapterError(f"unknown model '{model}': this server serves '{self.model_name}' only")
        self.adapters.check_name(model)
        return model

    def sampling(self, body: _Body, max_tokens: int, logprobs: bool) -> SamplingParams:
        return SamplingParams(max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p,
                              top_k=body.top_k, seed=body.seed, stop=tuple(body.stop_strings), logprobs=logprobs)

    def encode_chat(self, messages: list[ChatMessageBody]) -> list[int]:
        return self.prompt_format.encode([Message(m.role, m.text()) for m in messages], self.engine.tokenizer)

    def token_texts(self, token_ids) -> list[str]:
        return [self.engine.tokenizer.decode([t], skip_special_tokens=True) for t in token_ids]


def create_app(engine: Engine, adapters: AdapterManager | None, model_name: str, *, api_key: str | None = None,
               admin_key: str | None = None, request_timeout: float = 600.0,
               limits: ServeLimits | None = None, finetune=None) -> FastAPI:
    """`finetune` (a serve.finetune.jobs.FineTuningService) adds the files and fine-tuning job routes."""
    for flag, key in (("--api-key", api_key), ("--admin-key", admin_key)):
        if key is not None and not key.strip():
            raise ConfigError(f"{flag} is empty, which would leave the server open to anyone; give a non-empty key, "
                              "or leave the flag out to serve without one (fine on 127.0.0.1 only)")
    admin_key = admin_key if admin_key is not None else api_key
    limits = limits or ServeLimits()
    service = Service(engine, adapters, model_name, api_key, request_timeout, limits)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        if finetune is not None:
            finetune.start()
        try:
            yield
        finally:
            if finetune is not None:
                finetune.stop()
            engine.stop()

    # FastAPI's own /docs and /openapi.json take no dependencies; ours below take the key.
    app = FastAPI(title="tuneforge", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.service = service
    app.add_middleware(RequestGuard, max_body_bytes=limits.max_body_bytes)
    _install_error_handlers(app)
    authorized = [Depends(_key_checker(required=api_key is not None, keys=(api_key, admin_key)))]
    admin_only = [Depends(_key_checker(required=admin_key is not None, keys=(admin_key,), user_key_refused=api_key))]

    @app.get("/openapi.json", dependencies=authorized, include_in_schema=False)
    def openapi_schema():
        return JSONResponse(app.openapi())

    @app.get("/docs", dependencies=authorized, include_in_schema=False)
    def docs():
        return get_swagger_ui_html(openapi_url="/openapi.json", title="tuneforge API")

    @app.get("/health")
    def health():
        if not engine.running_in_thread:
            raise ApiError(503, "the engine is not running", "server_error", "engine_unavailable")
        return {"status": "ok", "queue_depth": engine.scheduler.queue_depth, "running": len(engine.scheduler.running)}

    @app.get("/metrics", dependencies=authorized)
    def metrics():
        loaded = len(adapters.loaded()) if adapters is not None else 0
        return PlainTextResponse(prometheus_text(engine.stats, loaded), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models", dependencies=authorized)
    def models():
        created = int(service.started)
        entries = [{"id": model_name, "object": "model", "created": created, "owned_by": "tuneforge",
                    "root": model_name, "parent": None}]
        for name in adapters.available() if adapters is not None else []:
            entries.append({"id": name, "object": "model", "created": created, "owned_by": "tuneforge",
                            "root": name, "parent": model_name})
        return {"object": "list", "data": entries}

    @app.post("/v1/adapters/load", dependencies=admin_only)
    async def load_adapter(body: AdapterBody):
        manager = _require_manager(adapters)
        return {"status": "loaded", **await run_in_threadpool(manager.load, body.name, body.pin)}

    @app.post("/v1/adapters/unload", dependencies=admin_only)
    async def unload_adapter(body: AdapterBody):
        return await run_in_threadpool(_require_manager(adapters).unload, body.name)

    if finetune is not None:
        from tuneforge.serve.finetune.routes import add_finetune_routes

        add_finetune_routes(app, finetune, admin_only)

    @app.post("/v1/completions", dependencies=authorized)
    async def completions(body: CompletionBody, request: Request):
        adapter = service.adapter_for(body.model)
        service.check_limits(body, len(body.prompt) if isinstance(body.prompt, str) else 0)
        prompt_ids = body.prompt if isinstance(body.prompt, list) else list(
            (await run_in_threadpool(engine.tokenizer, body.prompt))["input_ids"])
        params = service.sampling(body, body.max_tokens or 16, logprobs=body.logprobs is not None)
        return await _respond(service, request, GenerationRequest(tuple(prompt_ids), params, adapter), body,
                              _CompletionFormat(service, body.model))

    @app.post("/v1/chat/completions", dependencies=authorized)
    async def chat_completions(body: ChatBody, request: Request):
        adapter = service.adapter_for(body.model)
        service.check_limits(body, sum(len(m.text()) for m in body.messages))
        # Rendering a chat template costs more the longer the chat; off the event loop, so that
        # /health and every stream keep moving while it runs.
        prompt_ids = await run_in_threadpool(service.encode_chat, body.messages)
        room = engine.max_model_len - len(prompt_ids)
        max_tokens = body.max_completion_tokens or body.max_tokens or max(1, min(DEFAULT_CHAT_MAX_TOKENS, room))
        params = service.sampling(body, max_tokens, logprobs=body.logprobs)
        return await _respond(service, request, GenerationRequest(tuple(prompt_ids), params, adapter), body,
                              _ChatFormat(service, body.model))

    return app


def _require_manager(adapters: AdapterManager | None) -> AdapterManager:
    if adapters is None:
        raise ApiError(400, "this server has no adapters directory (start it with --adapters-dir)",
                       "invalid_request_error", "no_adapters_dir")
    return adapters


def _key_checker(*, required: bool, keys: tuple[str | None, ...], user_key_refused: str | None = None):
    """A dependency that lets a request through when no key is required or when it carries one of
    `keys`; `user_key_refused` (the API key on admin routes) gets a 403 saying what is missing
    instead of a 401."""
    accepted = [key.encode() for key in keys if key is not None]

    def check(request: Request) -> None:
        if not required:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        token = token.strip().encode() if scheme.lower() == "bearer" else b""
        # compare_digest against every key, so the time taken says nothing about which one was close
        if any([hmac.compare_digest(token, key) for key in accepted]):
            return
        if user_key_refused is not None and hmac.compare_digest(token, user_key_refused.encode()):
            raise ApiError(403, "this route changes what every user is served and needs the admin key (--admin-key)",
                           "invalid_request_error", "admin_key_required")
        raise ApiError(401, "missing or wrong API key: send the header 'Authorization: Bearer <key>'",
                       "invalid_request_error", "invalid_api_key")

    return check


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, error: ApiError):
        return JSONResponse(error_body(error), status_code=error.status)

    @app.exception_handler(TuneforgeError)
    async def tuneforge_error(request: Request, error: TuneforgeError):
        api = api_error_for(error)
        return JSONResponse(error_body(api), status_code=api.status)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, error: RequestValidationError):
        first = error.errors()[0] if error.errors() else {}
        location = [str(part) for part in first.get("loc", ()) if part != "body"]
        param = ".".join(location) or None
        message = f"{param}: {first.get('msg', 'invalid value')}" if param else first.get("msg", "invalid request body")
        return JSONResponse(error_body(ApiError(400, message, "invalid_request_error", "invalid_value", param)),
                            status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException):
        api = ApiError(error.status_code, str(error.detail), "invalid_request_error", None)
        return JSONResponse(error_body(api), status_code=error.status_code)


# ---- answering --------------------------------------------------------------------------------


async def _respond(service: Service, request: Request, generation: GenerationRequest, body: _Body, shape):
    loop = asyncio.get_running_loop()
    events: asyncio.Queue[Delta | BaseException] = asyncio.Queue()

    def on_delta(item) -> None:  # called on the engine thread
        loop.call_soon_threadsafe(events.put_nowait, item)

    handle = await run_in_threadpool(service.engine.submit, generation, on_delta)
    if body.stream:
        return StreamingResponse(_sse(service, handle, events, shape, body.include_usage), media_type="text/event-stream")
    deadline = loop.time() + service.request_timeout
    gone = asyncio.ensure_future(_client_gone(request))  # a client that hangs up frees its row at once
    try:
        while True:
            waiting = asyncio.ensure_future(events.get())
            done, _ = await asyncio.wait({waiting, gone}, timeout=max(0.0, deadline - loop.time()),
                                         return_when=asyncio.FIRST_COMPLETED)
            if waiting not in done:
                waiting.cancel()
                handle.cancel()
                if gone in done:  # nobody is left to answer; the status only reaches the server log
                    return JSONResponse(error_body(ApiError(499, "the client closed the connection",
                                                            "invalid_request_error", "client_closed")), 499)
                raise EngineTimeoutError(
                    f"the request did not finish within {service.request_timeout:g} s; it was cancelled")
            item = waiting.result()
            if isinstance(item, BaseException):
                raise item
            if item.finish_reason is not None:
                break
    except asyncio.CancelledError:
        handle.cancel()
        raise
    finally:
        gone.cancel()
    return shape.full(handle.result(0))


async def _client_gone(request: Request) -> None:
    """Returns once the client has disconnected (the body is already read, so the ASGI server's next
    message can only be the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _sse(service: Service, handle, events: asyncio.Queue, shape, include_usage: bool) -> AsyncIterator[str]:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + service.request_timeout
    try:
        yield _event(shape.first_chunk())
        while True:
            try:
                item = await asyncio.wait_for(events.get(), timeout=max(0.0, deadline - loop.time()))
            except asyncio.TimeoutError:
                handle.cancel()
                item = EngineTimeoutError(f"the request did not finish within {service.request_timeout:g} s")
            if isinstance(item, BaseException):
                yield _event(error_body(api_error_for(item)))
                break
            if item.text or item.finish_reason is not None:
                yield _event(shape.chunk(item))
            if item.finish_reason is not None:
                if include_usage:
                    yield _event({**shape.chunk(item), "choices": [], "usage": _usage(handle.result(0))})
                break
        yield "data: [DONE]\n\n"
    finally:
        if not handle.done:
            handle.cancel()  # the client went away: free the row


def _event(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


class _CompletionFormat:
    """OpenAI's text_completion objects."""

    def __init__(self, service: Service, model: str):
        self.service, self.model = service, model
        self.id, self.created = f"cmpl-{uuid.uuid4().hex}", int(time.time())

    def _logprobs(self, token_ids, logprobs) -> dict | None:
        if logprobs is None:
            return None
        tokens = self.service.token_texts(token_ids)
        offsets = [sum(len(t) for t in tokens[:i]) for i in range(len(tokens))]
        return {"tokens": tokens, "token_logprobs": list(logprobs), "top_logprobs": None, "text_offset": offsets}

    def full(self, result: Completion) -> dict:
        choice = {"index": 0, "text": result.text, "logprobs": self._logprobs(result.token_ids, result.logprobs),
                  "finish_reason": _openai_reason(result.finish_reason)}
        return {"id": self.id, "object": "text_completion", "created": self.created, "model": self.model,
                "choices": [choice], "usage": _usage(result)}

    def first_chunk(self) -> dict:
        return self._chunk("", None, None)

    def chunk(self, delta: Delta) -> dict:
        logprobs = self._logprobs(delta.token_ids, delta.logprobs) if delta.logprobs else None
        return self._chunk(delta.text, logprobs, _openai_reason(delta.finish_reason))

    def _chunk(self, text: str, logprobs, finish_reason) -> dict:
        return {"id": self.id, "object": "text_completion", "created": self.created, "model": self.model,
                "choices": [{"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}]}


class _ChatFormat:
    """OpenAI's chat.completion and chat.completion.chunk objects."""

    def __init__(self, service: Service, model: str):
        self.service, self.model = service, model
        self.id, self.created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

    def _logprobs(self, token_ids, logprobs) -> dict | None:
        if not logprobs:
            return None
        return {"content": [{"token": text, "logprob": value, "bytes": list(text.encode("utf-8")), "top_logprobs": []}
                            for text, value in zip(self.service.token_texts(token_ids), logprobs)]}

    def full(self, result: Completion) -> dict:
        choice = {"index": 0, "message": {"role": "assistant", "content": result.text},
                  "logprobs": self._logprobs(result.token_ids, result.logprobs),
                  "finish_reason": _openai_reason(result.finish_reason)}
        return {"id": self.id, "object": "chat.completion", "created": self.created, "model": self.model,
                "choices": [choice], "usage": _usage(result)}

    def first_chunk(self) -> dict:
        return self._chunk({"role": "assistant", "content": ""}, None, None)

    def chunk(self, delta: Delta) -> dict:
        content = {"content": delta.text} if delta.text else {}
        return self._chunk(content, self._logprobs(delta.token_ids, delta.logprobs), _openai_reason(delta.finish_reason))

    def _chunk(self, delta: dict, logprobs, finish_reason) -> dict:
        return {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                "choices": [{"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}]}


def _openai_reason(reason: str | None) -> str | None:
    # OpenAI knows "stop" and "length"; a cancelled request ended early, like a stop.
    return "stop" if reason == "cancelled" else reason


def _usage(result: Completion) -> dict:
    return {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens,
            "total_tokens": result.prompt_tokens + result.completion_tokens}
