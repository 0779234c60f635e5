"""What the HTTP layer bounds before any work starts, and the last word on unexpected errors.

    ServeLimits     body size, message count, prompt characters, stop strings (count and length)
    RequestGuard    ASGI middleware: a request id on every response (x-request-id), bodies over
                    max_body_bytes refused with 413 before they are parsed, and any exception no
                    handler mapped answered as a 500 in OpenAI's error shape naming the request id,
                    with the traceback in the server log only

The limits exist because the expensive steps (JSON parsing, chat-template rendering, tokenizing)
grow with what a client sends, and rendering a chat grows with the square of its message count:
one ~600 KB body of 20k messages held the event loop (and so every stream and /health) for long.
"""

from __future__ import annotations

import json
import logging
import uuid
from dataclasses import dataclass

from tuneforge.errors import ConfigError

log = logging.getLogger("tuneforge.serve")

# A token rarely covers more than a few characters; 32 per token of context leaves room for long
# runs of spaces or code while refusing, before any rendering, a prompt that cannot fit anyway.
CHARS_PER_TOKEN_BOUND = 32


@dataclass(frozen=True)
class ServeLimits:
    max_body_bytes: int = 2 * 1024 * 1024
    max_messages: int = 512
    max_prompt_chars: int | None = None  # None: CHARS_PER_TOKEN_BOUND x the engine's max_model_len
    max_stop_strings: int = 16
    max_stop_chars: int = 256

    def __post_init__(self):
        for name in ("max_body_bytes", "max_messages", "max_prompt_chars", "max_stop_strings", "max_stop_chars"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ConfigError(f"{name}={value!r} must be a positive integer")

    def prompt_chars(self, max_model_len: int) -> int:
        return self.max_prompt_chars or CHARS_PER_TOKEN_BOUND * max_model_len


def error_payload(message: str, error_type: str, code: str | None, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


class RequestGuard:
    """Pure ASGI (no BaseHTTPMiddleware): it reads the body once, then hands the app a `receive` that
    replays it and afterwards passes on the real one, so the app still sees the client disconnect."""

    def __init__(self, app, max_body_bytes: int):
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = f"req-{uuid.uuid4().hex[:20]}"
        started = False

        async def send_with_id(message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                message = {**message, "headers": [*message.get("headers", []), (b"x-request-id", request_id.encode())]}
            await send(message)

        try:
            body = await self._bounded_body(scope, receive)
            if body is None:
                await _send_json(send_with_id, 413, error_payload(
                    f"the request body exceeds {self.max_body_bytes} bytes (the server's --max-body-bytes)",
                    "invalid_request_error", "body_too_large"))
                return
            await self.app(scope, _replaying(body, receive), send_with_id)
        except Exception:
            log.error("request %s (%s %s) failed", request_id, scope.get("method"), scope.get("path"), exc_info=True)
            if not started:  # once a stream has started, all that is left is to end it
                await _send_json(send_with_id, 500, error_payload(
                    f"internal server error (request id {request_id}); the server log has the details",
                    "server_error", "internal_error"))

    async def _bounded_body(self, scope, receive) -> bytes | None:
        """The whole body, or None when it is (or declares itself) larger than the bound."""
        declared = dict(scope.get("headers", [])).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            return None
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left while sending
                return b"".join(chunks)
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_body_bytes:
                return None
            if not message.get("more_body", False):
                return b"".join(chunks)


def _replaying(body: bytes, receive):
    replayed = False

    async def replay():
        nonlocal replayed
        if not replayed:
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


async def _send_json(send, status: int, payload: dict) -> None:
    data = json.dumps(payload).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]})
    await send({"type": "http.response.body", "body": data, "more_body": False})
