"""What `distill serve` and the service share at the HTTP edge: the request guard and OpenAI's error shape.

`RequestGuard` is ASGI middleware in front of every route. For each request it

1. asks `admit(scope)` (when given) whether the caller may go on, before a byte of the body is read: the service
   decides authentication there, so an unauthenticated client cannot make it hold a large body;
2. counts the body's bytes as they arrive, whether the client sent a `Content-Length` or a chunked body, and
   answers 413 as soon as the count passes the limit (a declared length over the limit is refused before reading);
3. reads a bounded body whole and, when it is JSON, refuses nesting deeper than `max_depth` (400), so no parser
   down the line recurses without bound; then hands the body to the app. Paths in `streamed` (multipart uploads)
   are passed on as they arrive, with their own limit, counted the same way.

Errors have OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`; `install_error_handlers` gives
FastAPI's own errors (422 validation, 400 unreadable JSON, 404 unknown route) that shape too.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

MiB = 1024 * 1024
MAX_JSON_DEPTH = 64
KINDS = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error", 404: "not_found_error"}
_STRUCTURE = re.compile(rb'\\.|["\[\]{}]', re.DOTALL)  # an escaped character inside a string, a quote, a bracket


@dataclass(frozen=True)
class ServeLimits:
    """What one request may ask of the server; a request over a limit is refused with an OpenAI-shaped 400 (413 for
    the body). The service applies the same limits to its inference routes."""

    max_body_bytes: int = 4 * MiB  # the request body, counted as it arrives
    max_prompts: int = 256  # prompts in one completions request
    max_n: int = 128  # choices per prompt (OpenAI's own limit)
    max_tokens: int = 4096  # tokens generated per choice (the model's context also bounds it)
    max_sequences: int = 512  # prompts x n: the rows one request adds to the batches

    def __post_init__(self) -> None:
        for name, value in dataclasses.asdict(self).items():
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"serve limit {name} must be a positive integer, not {value!r}")


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    """OpenAI's error body; the type follows from the status (401 authentication_error, 5xx server_error...)."""
    kind = KINDS.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


@dataclass(frozen=True)
class Refusal:
    """An answer given by the guard itself instead of the app."""

    status: int
    message: str
    code: str
    param: str | None = None
    headers: Mapping[str, str] = field(default_factory=dict)

    async def send(self, send: Send) -> None:
        body = json.dumps(error_body(self.status, self.message, self.param, self.code)).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        headers += [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in self.headers.items()]
        headers.append((b"connection", b"close"))  # the rest of an unread body is not waited for
        await send({"type": "http.response.start", "status": self.status, "headers": headers})
        await send({"type": "http.response.body", "body": body, "more_body": False})


def too_large(limit: int) -> Refusal:
    return Refusal(413, f"the request body is over the limit of {limit} bytes", "too_large")


def json_too_deep(raw: bytes, limit: int = MAX_JSON_DEPTH) -> bool:
    """Whether the JSON text `raw` nests arrays and objects more than `limit` deep (brackets inside strings do not
    count). Counting all brackets first answers most bodies at C speed."""
    if raw.count(b"[") + raw.count(b"{") <= limit:
        return False
    depth, in_string = 0, False
    for match in _STRUCTURE.finditer(raw):
        token = match.group()
        if token[0] == 0x5C:  # a backslash: the escaped character is skipped with it
            continue
        if token == b'"':
            in_string = not in_string
        elif not in_string:
            depth += 1 if token in (b"[", b"{") else -1
            if depth > limit:
                return True
    return False


class BodyTooLarge(Exception):
    """Raised from `receive` when a streamed body passes its limit; the guard answers 413."""


Admit = Callable[[Scope], Awaitable["Refusal | None"]]


class RequestGuard:
    """The middleware described in the module docstring."""

    def __init__(
        self,
        app: ASGIApp,
        max_bytes: int,
        *,
        streamed: Mapping[str, int] | None = None,
        max_depth: int = MAX_JSON_DEPTH,
        admit: Admit | None = None,
    ) -> None:
        if max_bytes < 1:
            raise ValueError(f"max_bytes must be at least 1, not {max_bytes}")
        self.app, self.max_bytes, self.max_depth, self.admit = app, max_bytes, max_depth, admit
        self.streamed = dict(streamed or {})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.admit is not None and (refusal := await self.admit(scope)) is not None:
            await refusal.send(send)
            return
        if scope["path"] in self.streamed:  # the app may refuse a declared length itself, in its own words
            await self._streamed(scope, receive, send, self.streamed[scope["path"]])
            return
        limit = self.max_bytes
        declared = _header(scope, b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > limit):
            refusal = too_large(limit) if declared.isdigit() else Refusal(400, "bad Content-Length", "invalid_header")
            await refusal.send(send)
            return
        body = await _read_body(receive, limit)
        if body is None:  # the client left
            return
        if isinstance(body, Refusal):
            await body.send(send)
            return
        if body and _is_json(scope) and json_too_deep(body, self.max_depth):
            message = f"the JSON body nests arrays and objects more than {self.max_depth} deep"
            await Refusal(400, message, "json_too_deep").send(send)
            return
        await self.app(scope, _replay(body, receive), send)

    async def _streamed(self, scope: Scope, receive: Receive, send: Send, limit: int) -> None:
        received, started = 0, False

        async def counted() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge
            return message

        async def watched(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted, watched)
        except BodyTooLarge:
            if not started:
                await too_large(limit).send(send)


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", []):
        if key.lower() == name:
            return str(value.decode("latin-1")).strip()
    return None


def _is_json(scope: Scope) -> bool:
    kind = (_header(scope, b"content-type") or "").split(";")[0].strip().lower()
    return kind == "application/json" or kind.endswith("+json") or kind == ""


async def _read_body(receive: Receive, limit: int) -> bytes | Refusal | None:
    """The whole body, or a 413 refusal as soon as more than `limit` bytes came, or None if the client left."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return too_large(limit)
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def _replay(body: bytes, receive: Receive) -> Receive:
    """A `receive` that gives the app the body read above, then waits on the client (for its disconnect)."""
    delivered = False

    async def replay() -> Message:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


def install_error_handlers(app: Any) -> None:
    """FastAPI's own errors in OpenAI's shape: request validation (422, the field in `param`) and HTTP errors it
    raises itself (400 for a body it cannot parse, 404, 405...)."""
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException

    def validation(_: Any, error: Exception) -> JSONResponse:
        assert isinstance(error, RequestValidationError)
        problems = []
        for item in error.errors():
            loc = [str(p) for p in item["loc"]]
            where = ".".join(loc[1:] if loc and loc[0] in ("body", "query", "path", "header") else loc) or "body"
            if item.get("type") == "json_invalid":  # its location is a character offset, not a field
                where = "body"
            problems.append((where, item["msg"]))
        where, message = problems[0] if problems else ("body", "invalid request")
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        return JSONResponse(error_body(422, f"{where}: {message}{more}", where, "invalid_value"), status_code=422)

    def http_error(_: Any, error: Exception) -> JSONResponse:
        assert isinstance(error, HTTPException)
        code = {404: "not_found", 405: "method_not_allowed"}.get(error.status_code, "invalid_request")
        body = error_body(error.status_code, str(error.detail), None, code)
        return JSONResponse(body, status_code=error.status_code, headers=getattr(error, "headers", None))

    app.add_exception_handler(RequestValidationError, validation)
    app.add_exception_handler(HTTPException, http_error)
