"""The app of `distill serve` (its routes over one served model) and the ways to run it: `serve` until interrupted,
`serve_in_thread` for a program that is its own client."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from distill.asgi import RequestGuard, ServeLimits, error_body, install_error_handlers
from distill.batcher import Batcher
from distill.compute import check_device
from distill.engine import Engine
from distill.errors import DistillError
from distill.hf import load_causal_lm, load_tokenizer
from distill.serve import cascade_answers
from distill.serve.cascade import Cascade, CascadeSetup, build
from distill.serve.prompts import encode_texts, read_prompts, sampling_rows
from distill.serve.requests import APIError, ChatRequest, CompletionRequest, chat_prompt, check_limits
from distill.serve.responses import CLIENT_GONE, Completions, FastJSON, chat_choice, usage
from distill.serve.streams import chat_stream, completion_stream, generated

DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's legacy default for max_tokens


def _api_error(_: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, APIError)
    body = {"message": error.message, "type": error.kind, "param": error.param, "code": error.code}
    return JSONResponse({"error": body}, status_code=error.status)


def _server_error(_: Request, error: Exception) -> JSONResponse:
    """Anything unexpected: a 500 in OpenAI's shape (the server still logs the traceback)."""
    return JSONResponse(error_body(500, f"the server failed: {error}", None, "server_error"), status_code=500)


@dataclass(frozen=True)
class _Model:
    """What the routes of one served model share."""

    name: str
    engine: Engine
    batcher: Batcher
    limits: ServeLimits
    cascade: Cascade | None = None

    def check(self, requested: str) -> None:
        if requested != self.name:
            message = f"the model {requested!r} does not exist; this server serves {self.name!r}"
            raise APIError(404, message, "model_not_found", param="model")

    def check_scoring(self, body: CompletionRequest) -> None:
        """Refuse (400) to score prompts with a model whose prompts cannot be scored (`scoring.head_problem`)."""
        problem = self.engine.scoring_problem
        if body.prompt_top() is not None and problem is not None:
            param = "prompt_logprobs" if body.prompt_logprobs is not None else "echo"
            message = f"{param}: this model's prompt log-probs are not available: {problem}"
            raise APIError(400, message, "prompt_scoring_unavailable", param=param)


def _head(kind: str, model: str) -> dict[str, Any]:
    prefix = "chatcmpl" if kind == "chat" else "cmpl"
    head = {"id": f"{prefix}-{uuid.uuid4().hex}", "created": int(time.time()), "model": model}
    return head if kind == "chat" else {"object": "text_completion"} | head


async def _chat(model: _Model, body: ChatRequest, request: Request) -> Response:
    """POST /v1/chat/completions: limits, then the template and tokens (in a thread), then generation."""
    model.check(body.model)
    max_tokens, param = body.token_limit()
    check_limits(model.limits, 1, body.n or 1, max_tokens, param)
    engine = model.engine
    text, special = await asyncio.to_thread(chat_prompt, engine.tokenizer, body.messages)
    (prompt,) = await asyncio.to_thread(encode_texts, engine, [text], special, max_tokens, "messages", param)
    top = (body.top_logprobs or 0) if body.logprobs else None
    rows = sampling_rows(engine, [prompt], body, max_tokens, model.limits.max_tokens, top)
    head = _head("chat", model.name)
    if model.cascade is not None:
        return await cascade_answers.chat(model.cascade, model.batcher, rows, body, head, top, len(prompt.ids), request)
    if body.stream:
        return chat_stream(model.batcher, rows, head, top, len(prompt.ids), body.include_usage())
    if not await generated(request, model.batcher, rows):
        return Response(status_code=CLIENT_GONE)

    def respond() -> Response:
        choices = [chat_choice(i, row, top) for i, row in enumerate(rows)]
        totals = usage(rows, len(prompt.ids))
        return FastJSON(head | {"object": "chat.completion", "choices": choices, "usage": totals})

    return await asyncio.to_thread(respond)


async def _complete(model: _Model, body: CompletionRequest, request: Request) -> Response:
    """POST /v1/completions: limits, then the prompts' tokens (in a thread), then scoring and generation."""
    model.check(body.model)
    forms, n = body.prompts(), body.n or 1
    check_limits(model.limits, len(forms), n, body.max_tokens)
    model.check_scoring(body)
    engine = model.engine
    prompts = await asyncio.to_thread(read_prompts, engine, forms, body.max_tokens)
    default = min(DEFAULT_COMPLETION_TOKENS, model.limits.max_tokens)
    ranked = body.prompt_logprobs is not None  # vLLM's prompt_logprobs show each token's rank
    rows = sampling_rows(engine, prompts, body, body.max_tokens, default, body.logprobs, body.prompt_top(), ranked)
    shape, head = Completions(body, prompts, engine.tokenizer, engine.token_text), _head("completion", model.name)
    if model.cascade is not None:
        return await cascade_answers.complete(model.cascade, model.batcher, rows, body, head, shape, request)
    if body.stream:
        return completion_stream(model.batcher, rows, head, shape, body.include_usage())
    if not await generated(request, model.batcher, rows):
        return Response(status_code=CLIENT_GONE)

    def respond() -> Response:
        choices = [shape.choice(i, rows) for i in range(len(rows))]
        return FastJSON(head | {"choices": choices, "usage": usage(rows, shape.prompt_tokens())})

    return await asyncio.to_thread(respond)


def _served_model(
    model_path: str | Path, model_name: str | None, device: str, max_batch_size: int, batch_wait_ms: float,
    limits: ServeLimits,
) -> _Model:  # fmt: skip
    if not 1 <= max_batch_size <= 65_536 or not 0 <= batch_wait_ms <= 60_000:
        message = (
            f"max_batch_size must be 1 to 65536 and batch_wait_ms 0 to 60000, not {max_batch_size}, {batch_wait_ms}"
        )
        raise DistillError(message)
    check_device(device)
    tokenizer = load_tokenizer(model_path)
    try:
        engine = Engine(load_causal_lm(model_path), tokenizer, device)
    except (RuntimeError, ValueError, AssertionError) as error:
        raise DistillError(f"cannot serve {model_path} on {device}: {str(error).splitlines()[0]}") from None
    name = model_name or Path(str(model_path)).name
    return _Model(name, engine, Batcher(engine, max_batch_size, batch_wait_ms), limits)


def create_app(
    model_path: str | Path,
    *,
    model_name: str | None = None,
    device: str = "cpu",
    max_batch_size: int = 16,
    batch_wait_ms: float = 5.0,
    limits: ServeLimits = ServeLimits(),
    cascade: CascadeSetup | None = None,
) -> FastAPI:
    """The FastAPI app serving the causal LM in `model_path` (save_pretrained layout, with its tokenizer), each
    request held to `limits` (the body size by `asgi.RequestGuard`, the rest before tokenizing); with `cascade`, as
    the student of an LM cascade (`serve.cascade`; its threshold is chosen here when the setup gives a validation
    file instead)."""
    model = _served_model(model_path, model_name, device, max_batch_size, batch_wait_ms, limits)
    if cascade is not None:
        model = replace(model, cascade=build(cascade, model.engine))
    card = {"id": model.name, "object": "model", "created": int(time.time()), "owned_by": "distill"}
    card |= {"kind": "cascade"} if cascade is not None else {}

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        await model.batcher.close()
        if model.cascade is not None:
            await model.cascade.teacher.aclose()

    app = FastAPI(title=f"distill serve: {model.name}", lifespan=lifespan)
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(Exception, _server_error)
    install_error_handlers(app)
    app.add_middleware(RequestGuard, max_bytes=limits.max_body_bytes)

    @app.get("/v1/models")
    def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [card]}

    @app.get("/v1/models/{model_id:path}")
    def get_model(model_id: str) -> dict[str, Any]:
        model.check(model_id)
        return card

    @app.get("/v1/cascade")
    def cascade_statistics() -> dict[str, Any]:
        """The cascade's teacher, confidence measure, threshold, validation figures and live counts."""
        if model.cascade is None:
            raise APIError(404, "this server serves a model, not a cascade (start it with --teacher-url)", "not_found")
        return model.cascade.public()

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(body: ChatRequest, request: Request) -> Response:
        return await _chat(model, body, request)

    @app.post("/v1/completions", response_model=None)
    async def completions(body: CompletionRequest, request: Request) -> Response:
        return await _complete(model, body, request)

    return app


def _listen(host: str, port: int) -> socket.socket:
    """A TCP socket bound to `host`:`port` (0: a free port); DistillError when that is not possible."""
    if not 0 <= port <= 65_535:
        raise DistillError(f"port {port} is out of range (1 to 65535)")
    listener = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((host, port))
    except OSError as error:
        listener.close()
        raise DistillError(f"cannot listen on {host}:{port}: {error.strerror or error}") from None
    return listener


def serve(
    model_path: str | Path,
    host: str = "127.0.0.1",
    port: int = 8000,
    *,
    model_name: str | None = None,
    device: str = "cpu",
    max_batch_size: int = 16,
    batch_wait_ms: float = 5.0,
    limits: ServeLimits = ServeLimits(),
    log_level: str = "info",
    cascade: CascadeSetup | None = None,
) -> None:
    """Serve the model in `model_path` over HTTP until interrupted (uvicorn, one process). The device and the address
    are checked before the model loads: a device this machine lacks, a port out of range or in use is a DistillError
    at once."""
    import uvicorn

    check_device(device)
    listener = _listen(host, port)
    try:
        app = create_app(
            model_path, model_name=model_name, device=device, max_batch_size=max_batch_size,
            batch_wait_ms=batch_wait_ms, limits=limits, cascade=cascade,
        )  # fmt: skip
        uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level)).run(sockets=[listener])
    finally:
        listener.close()


@contextmanager
def serve_in_thread(
    model_path: str | Path,
    *,
    model_name: str | None = None,
    device: str = "cpu",
    max_batch_size: int = 16,
    batch_wait_ms: float = 5.0,
    limits: ServeLimits = ServeLimits(),
    host: str = "127.0.0.1",
    start_timeout: float = 60.0,
    cascade: CascadeSetup | None = None,
) -> Iterator[str]:
    """Serve the model in `model_path` from a background thread (uvicorn on a free port of `host`) and yield the
    base URL of its API, e.g. "http://127.0.0.1:40123/v1"; on exit the server finishes its requests and stops.

    For a program that is its own client (a recipe sampling from the teacher it trained): real HTTP on loopback,
    no second process. Access logs are off; uvicorn reports only warnings and errors.
    """
    import uvicorn

    app = create_app(
        model_path, model_name=model_name, device=device, max_batch_size=max_batch_size, batch_wait_ms=batch_wait_ms,
        limits=limits, cascade=cascade,
    )  # fmt: skip
    listener = _listen(host, 0)  # port 0: the system picks a free one, held from here on (no race with others)
    port = int(listener.getsockname()[1])
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False))
    failure: list[BaseException] = []

    def run() -> None:
        try:
            server.run(sockets=[listener])
        except BaseException as error:  # noqa: BLE001 - reported to the caller below
            failure.append(error)

    thread = threading.Thread(target=run, name=f"distill-serve-{port}", daemon=True)
    thread.start()
    deadline = time.monotonic() + start_timeout
    try:
        while not server.started:
            if not thread.is_alive() or failure:
                reason = f": {failure[0]}" if failure else ""
                raise DistillError(f"the server for {model_path} stopped while starting{reason}")
            if time.monotonic() > deadline:
                raise DistillError(f"the server for {model_path} did not start within {start_timeout:g} s")
            time.sleep(0.01)
        yield f"http://{host}:{port}/v1"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        listener.close()
