"""`distill serve`: an OpenAI-compatible HTTP server for a local causal LM folder (a student, or any HF model).

Endpoints: `GET /v1/models`, `GET /v1/models/{id}`, `POST /v1/chat/completions`, `POST /v1/completions`, with
OpenAI's request fields `model`, `messages` / `prompt` (a string or a list of strings), `n`, `temperature` (0 is
greedy), `top_p`, `max_tokens` (chat also `max_completion_tokens`), `stop` (up to 4 strings), `seed`, `logprobs`
(chat: a bool and `top_logprobs` 0..20; completions: 0..5 in the legacy `tokens` / `token_logprobs` /
`top_logprobs` / `text_offset` format, offsets counted from the start of the prompt), `stream` and
`stream_options.include_usage`. Other fields are refused rather than silently ignored, and so are infinite or NaN
numbers.

Every error has OpenAI's body `{"error": {"message", "type", "param", "code"}}`, `param` naming the field:

- a body over `ServeLimits.max_body_bytes`: 413 as soon as the count passes it, chunked or not (`asgi.RequestGuard`);
  JSON nested more than 64 deep: 400;
- a malformed request: 422; unknown model: 404;
- over the limits of `ServeLimits`, checked before any text is tokenized: more prompts than `max_prompts`
  (`too_many_prompts`), `n` over `max_n` (`n_too_large`), prompts x n over `max_sequences` (`too_many_sequences`),
  `max_tokens` over `max_tokens` (`max_tokens_too_large`): 400;
- a prompt (plus an explicit `max_tokens`) longer than the model's context: 400 `context_length_exceeded`; a prompt
  of more than `sampling.CHARS_PER_TOKEN` characters per token of context is refused so before it is tokenized.

- `max_tokens` defaults to 16 for completions (as OpenAI's legacy endpoint) and to the rest of the context for chat,
  at most `ServeLimits.max_tokens` either way.
- `completion_tokens` counts the generated tokens, a final end-of-sequence token included.
- With `seed`, choice `i` samples with seed `seed + i`: the same request gives the same choices.
- Chat prompts use the tokenizer's chat template when it has one. Otherwise each message becomes one line
  `System: ...`, `User: ...` or `Assistant: ...` (a `developer` message counts as system), and the prompt ends with
  a final line `Assistant:`; the reply is what the model writes after it.

Templating, tokenizing, generating and rendering a response run in worker threads: the event loop only moves bytes,
so one large request does not stall the others. Concurrent requests are batched (see `distill.engine`);
streaming sends `data: {chunk}` server-sent events in OpenAI's chunk format and ends with `data: [DONE]`. A client
that disconnects, streaming or not, cancels its generation: its rows stop at the next step of their batch.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, model_validator

from distill.asgi import RequestGuard, ServeLimits, install_error_handlers
from distill.engine import Batcher, Engine, PromptTooLong, SamplingParams, Sequence, TokenLogprob
from distill.errors import DistillError
from distill.hf import load_causal_lm, load_tokenizer

ROLE_NAMES = {"system": "System", "developer": "System", "user": "User", "assistant": "Assistant"}
TOO_LONG = "context_length_exceeded"
CLIENT_GONE = 499  # the status of an answer nobody receives (the client left before it was ready)
StopText = Annotated[str, Field(min_length=1)]


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    model: str
    n: int | None = Field(None, ge=1)  # at most ServeLimits.max_n (400 n_too_large)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    max_tokens: int | None = Field(None, ge=1)  # at most ServeLimits.max_tokens (400 max_tokens_too_large)
    stop: StopText | Annotated[list[StopText], Field(max_length=4)] | None = None
    seed: int | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    user: str | None = None

    def stops(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class Message(BaseModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ChatRequest(_Request):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)

    @model_validator(mode="after")
    def _top_logprobs_need_logprobs(self) -> ChatRequest:
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        return self

    def token_limit(self) -> tuple[int | None, str]:
        """The completion length asked for (`max_completion_tokens` first), and the field that asked."""
        if self.max_completion_tokens is not None:
            return self.max_completion_tokens, "max_completion_tokens"
        return self.max_tokens, "max_tokens"


class CompletionRequest(_Request):
    prompt: str | Annotated[list[str], Field(min_length=1)]
    logprobs: int | None = Field(None, ge=0, le=5)


class APIError(Exception):
    """An error answered with OpenAI's error body."""

    def __init__(
        self, status: int, message: str, code: str, kind: str = "invalid_request_error", param: str | None = None
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.kind, self.param = status, message, code, kind, param


def _error_response(_: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, APIError)
    body = {"message": error.message, "type": error.kind, "param": error.param, "code": error.code}
    return JSONResponse({"error": body}, status_code=error.status)


def check_limits(limits: ServeLimits, prompts: int, n: int, max_tokens: int | None, param: str = "max_tokens") -> None:
    """Refuse (APIError 400, `param` naming the field) a request of `prompts` prompts x `n` choices of up to
    `max_tokens` tokens that asks more than `limits` allow. Cheap: called before any text is tokenized."""
    if prompts > limits.max_prompts:
        message = f"{prompts} prompts in one request; this server takes at most {limits.max_prompts}"
        raise APIError(400, message, "too_many_prompts", param="prompt")
    if n > limits.max_n:
        raise APIError(400, f"n is {n}; this server gives at most {limits.max_n} choices", "n_too_large", param="n")
    if prompts * n > limits.max_sequences:
        message = (
            f"{prompts} prompts x n={n} make {prompts * n} sequences; this server generates at most "
            f"{limits.max_sequences} per request"
        )
        raise APIError(400, message, "too_many_sequences", param="n")
    if max_tokens is not None and max_tokens > limits.max_tokens:
        message = f"{param} is {max_tokens}; this server generates at most {limits.max_tokens} tokens per choice"
        raise APIError(400, message, "max_tokens_too_large", param=param)


def check_device(device: str) -> None:
    """Refuse (DistillError) a device this machine does not have, before any model is loaded."""
    try:
        kind = torch.device(device)
    except (RuntimeError, ValueError):
        raise DistillError(f"{device!r} is not a device; use cpu, cuda, cuda:N or mps") from None
    if kind.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (kind.index or 0) >= count:
            have = f"cuda:0 to cuda:{count - 1}" if count else "no CUDA device"
            raise DistillError(f"cannot serve on {device}: this machine has {have}")
    elif kind.type == "mps" and not torch.backends.mps.is_available():
        raise DistillError(f"cannot serve on {device}: this machine has no MPS device")
    elif kind.type not in ("cpu", "cuda", "mps"):
        raise DistillError(f"cannot serve on {device}; use cpu, cuda, cuda:N or mps")


def chat_prompt(tokenizer: Any, messages: list[Message]) -> tuple[str, bool]:
    """The prompt text for `messages`, and whether the tokenizer should still add its special tokens."""
    if getattr(tokenizer, "chat_template", None):
        turns = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in messages]
        return str(tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)), False
    lines = [f"{ROLE_NAMES[m.role]}: {m.text()}" for m in messages]
    return "\n".join([*lines, "Assistant:"]), True


def _seed(seed: int | None, choice: int) -> int | None:
    return None if seed is None else (seed + choice) % 2**63


def _encode(
    engine: Engine, texts: list[str], special: bool, max_tokens: int | None, param: str, token_param: str
) -> list[list[int]]:
    """The token ids of each prompt (in a worker thread: this is the slow part). A prompt with no room left in the
    context for an explicit `max_tokens` (else for one token) is refused (400) as soon as it is tokenized."""
    prompts = []
    for text in texts:
        try:
            ids = engine.encode(text, special_tokens=special)
        except PromptTooLong as error:
            message = (
                f"the prompt is {error.chars} characters, more than this model's context of {engine.context} tokens "
                f"can hold (it reads at most {error.max_chars} characters); shorten the prompt"
            )
            raise APIError(400, message, TOO_LONG, param=param) from None
        room = engine.context - len(ids)
        prompt = f"the prompt is {len(ids)} tokens and this model's context is {engine.context} tokens"
        if room < 1:
            raise APIError(
                400, f"{prompt}: no room is left for a completion; shorten the prompt", TOO_LONG, param=param
            )
        if max_tokens is not None and max_tokens > room:
            message = f"{prompt}: {token_param} {max_tokens} does not fit; ask for at most {room}"
            raise APIError(400, message, TOO_LONG, param=token_param)
        prompts.append(ids)
    return prompts


def _rows(
    engine: Engine, prompts: list[list[int]], body: _Request, max_tokens: int | None, default: int, top: int | None
) -> list[Sequence]:
    """One `Sequence` per prompt and choice (prompt-major, as OpenAI numbers the choices). Without an explicit
    `max_tokens` a choice gets `default` tokens, cut to the room the context leaves."""
    rows = []
    for ids in prompts:
        for choice in range(body.n or 1):
            params = SamplingParams(
                max_tokens=max_tokens or min(default, engine.context - len(ids)),
                temperature=1.0 if body.temperature is None else body.temperature,
                top_p=1.0 if body.top_p is None else body.top_p,
                seed=_seed(body.seed, choice),
                stop=body.stops(),
                top_logprobs=top,
            )
            rows.append(Sequence(list(ids), params))
    return rows


def _usage(rows: list[Sequence], prompt_tokens: int) -> dict[str, int]:
    completion = sum(row.generated for row in rows)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion, "total_tokens": prompt_tokens + completion}


def _chat_logprobs(entries: list[TokenLogprob]) -> dict[str, Any]:
    def item(token: str, logprob: float) -> dict[str, Any]:
        return {"token": token, "logprob": logprob, "bytes": list(token.encode())}

    return {"content": [item(e.token, e.logprob) | {"top_logprobs": [item(*t) for t in e.top]} for e in entries]}


def _legacy_logprobs(entries: list[TokenLogprob], start: int) -> dict[str, Any]:
    return {
        "tokens": [e.token for e in entries],
        "token_logprobs": [e.logprob for e in entries],
        "top_logprobs": [dict(e.top) for e in entries],
        "text_offset": [start + e.offset for e in entries],
    }


def _sse(data: Any) -> str:
    return f"data: {json.dumps(data)}\n\n"


Chunk = Callable[[int, str, list[TokenLogprob], str | None], dict[str, Any]]


async def _stream(
    batcher: Batcher,
    rows: list[Sequence],
    chunk: Chunk,
    opening: list[dict[str, Any]],
    usage: Callable[[], dict[str, Any]] | None,
) -> AsyncIterator[str]:
    """Server-sent events: `opening` chunks, one chunk per settled piece of text, the usage chunk, [DONE]. When the
    client leaves (the server cancels or closes this iterator), the generation is cancelled."""
    loop, events = asyncio.get_running_loop(), asyncio.Queue[Any]()
    for index, row in enumerate(rows):

        def on_delta(text: str, entries: list[TokenLogprob], finish: str | None, i: int = index) -> None:
            loop.call_soon_threadsafe(events.put_nowait, (i, text, entries, finish))  # from the worker thread

        row.on_delta = on_delta
    task = asyncio.create_task(batcher.run(rows))

    def finished(task: asyncio.Task[None]) -> None:
        if not task.cancelled():
            task.exception()  # retrieved, so a stream the client left logs no "exception never retrieved"
        events.put_nowait(None)  # comes after every event: they were queued before the batch finished

    task.add_done_callback(finished)
    try:
        for data in opening:
            yield _sse(data)
        while (event := await events.get()) is not None:
            yield _sse(chunk(*event))
    finally:
        if not task.done():
            task.cancel()  # the client left: Batcher.run marks the rows cancelled
    if task.exception() is not None:
        yield _sse(
            {"error": {"message": f"generation failed: {task.exception()}", "type": "server_error", "code": None}}
        )
        return
    if usage is not None:
        yield _sse(usage())
    yield "data: [DONE]\n\n"


async def _disconnect(receive: Callable[[], Awaitable[Any]]) -> None:
    """Returns when the client has gone (after the body, the next ASGI message a server sends is the disconnect)."""
    while (await receive())["type"] != "http.disconnect":
        pass


async def _generated(request: Request, batcher: Batcher, rows: list[Sequence]) -> bool:
    """Generate `rows` while watching the connection: True when they are done; False when the client disconnected
    first, in which case the rows are cancelled (they stop at their batch's next step)."""
    work = asyncio.ensure_future(batcher.run(rows))
    gone = asyncio.ensure_future(_disconnect(request.receive))
    try:
        await asyncio.wait((work, gone), return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not work.done():
            work.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await work
    if work.cancelled():
        return False
    work.result()  # a failed generation raises here
    return True


def _chat_stream(
    batcher: Batcher, rows: list[Sequence], head: dict[str, Any], top: int | None, prompt_tokens: int, usage: bool
) -> StreamingResponse:
    chunk_head = head | {"object": "chat.completion.chunk"} | ({"usage": None} if usage else {})

    def chunk(index: int, delta: str, entries: list[TokenLogprob], finish: str | None) -> dict[str, Any]:
        logprobs = _chat_logprobs(entries) if top is not None and entries else None
        message = {"content": delta} if delta or finish is None else {}
        choice = {"index": index, "delta": message, "logprobs": logprobs, "finish_reason": finish}
        return chunk_head | {"choices": [choice]}

    role = {"delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
    opening = [chunk_head | {"choices": [{"index": i} | role]} for i in range(len(rows))]
    totals = (lambda: chunk_head | {"choices": [], "usage": _usage(rows, prompt_tokens)}) if usage else None
    return StreamingResponse(_stream(batcher, rows, chunk, opening, totals), media_type="text/event-stream")


def _chat_response(head: dict[str, Any], rows: list[Sequence], top: int | None, prompt_tokens: int) -> JSONResponse:
    choices = [
        {
            "index": i,
            "message": {"role": "assistant", "content": row.text},
            "logprobs": _chat_logprobs(row.logprobs) if top is not None else None,
            "finish_reason": row.finish_reason,
        }
        for i, row in enumerate(rows)
    ]
    return JSONResponse(head | {"object": "chat.completion", "choices": choices, "usage": _usage(rows, prompt_tokens)})


def _completion_stream(
    batcher: Batcher, rows: list[Sequence], head: dict[str, Any], want: bool, starts: list[int], prompt_tokens: int,
    usage: bool,
) -> StreamingResponse:  # fmt: skip
    chunk_head = head | ({"usage": None} if usage else {})

    def chunk(index: int, delta: str, entries: list[TokenLogprob], finish: str | None) -> dict[str, Any]:
        logprobs = _legacy_logprobs(entries, starts[index]) if want and entries else None
        choice = {"index": index, "text": delta, "logprobs": logprobs, "finish_reason": finish}
        return chunk_head | {"choices": [choice]}

    totals = (lambda: chunk_head | {"choices": [], "usage": _usage(rows, prompt_tokens)}) if usage else None
    return StreamingResponse(_stream(batcher, rows, chunk, [], totals), media_type="text/event-stream")


def _completion_response(
    head: dict[str, Any], rows: list[Sequence], want: bool, starts: list[int], prompt_tokens: int
) -> JSONResponse:
    choices = [
        {
            "index": i,
            "text": row.text,
            "logprobs": _legacy_logprobs(row.logprobs, starts[i]) if want else None,
            "finish_reason": row.finish_reason,
        }
        for i, row in enumerate(rows)
    ]
    return JSONResponse(head | {"choices": choices, "usage": _usage(rows, prompt_tokens)})


def _include_usage(body: _Request) -> bool:
    return body.stream_options is not None and body.stream_options.include_usage


@dataclass(frozen=True)
class _Model:
    """What the routes of one served model share."""

    name: str
    engine: Engine
    batcher: Batcher
    limits: ServeLimits

    def check(self, requested: str) -> None:
        if requested != self.name:
            message = f"the model {requested!r} does not exist; this server serves {self.name!r}"
            raise APIError(404, message, "model_not_found", param="model")


async def _chat(model: _Model, body: ChatRequest, request: Request) -> Response:
    """POST /v1/chat/completions: limits, then the template and tokens (in a thread), then generation."""
    model.check(body.model)
    max_tokens, param = body.token_limit()
    check_limits(model.limits, 1, body.n or 1, max_tokens, param)
    engine = model.engine
    text, special = await asyncio.to_thread(chat_prompt, engine.tokenizer, body.messages)
    (prompt,) = await asyncio.to_thread(_encode, engine, [text], special, max_tokens, "messages", param)
    top = (body.top_logprobs or 0) if body.logprobs else None
    rows = _rows(engine, [prompt], body, max_tokens, model.limits.max_tokens, top)
    head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": model.name}
    if body.stream:
        return _chat_stream(model.batcher, rows, head, top, len(prompt), _include_usage(body))
    if not await _generated(request, model.batcher, rows):
        return Response(status_code=CLIENT_GONE)
    return await asyncio.to_thread(_chat_response, head, rows, top, len(prompt))


async def _complete(model: _Model, body: CompletionRequest, request: Request) -> Response:
    """POST /v1/completions: limits, then the tokens (in a thread), then generation."""
    model.check(body.model)
    texts, n = [body.prompt] if isinstance(body.prompt, str) else body.prompt, body.n or 1
    check_limits(model.limits, len(texts), n, body.max_tokens)
    engine = model.engine
    prompts = await asyncio.to_thread(_encode, engine, texts, True, body.max_tokens, "prompt", "max_tokens")
    rows = _rows(engine, prompts, body, body.max_tokens, min(16, model.limits.max_tokens), body.logprobs)
    starts = [len(texts[i // n]) for i in range(len(rows))]  # legacy text_offset counts the prompt
    prompt_tokens, want = sum(len(ids) for ids in prompts), body.logprobs is not None
    head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time())}
    head["model"] = model.name
    if body.stream:
        return _completion_stream(model.batcher, rows, head, want, starts, prompt_tokens, _include_usage(body))
    if not await _generated(request, model.batcher, rows):
        return Response(status_code=CLIENT_GONE)
    return await asyncio.to_thread(_completion_response, head, rows, want, starts, prompt_tokens)


def create_app(
    model_path: str | Path,
    *,
    model_name: str | None = None,
    device: str = "cpu",
    max_batch_size: int = 16,
    batch_wait_ms: float = 5.0,
    limits: ServeLimits = ServeLimits(),
) -> FastAPI:
    """The FastAPI app serving the causal LM in `model_path` (save_pretrained layout, with its tokenizer), each
    request held to `limits` (the body size by `asgi.RequestGuard`, the rest before tokenizing)."""
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
    model = _Model(
        model_name or Path(str(model_path)).name, engine, Batcher(engine, max_batch_size, batch_wait_ms), limits
    )
    card = {"id": model.name, "object": "model", "created": int(time.time()), "owned_by": "distill"}

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        await model.batcher.close()

    app = FastAPI(title=f"distill serve: {model.name}", lifespan=lifespan)
    app.add_exception_handler(APIError, _error_response)
    install_error_handlers(app)
    app.add_middleware(RequestGuard, max_bytes=limits.max_body_bytes)

    @app.get("/v1/models")
    def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [card]}

    @app.get("/v1/models/{model_id:path}")
    def get_model(model_id: str) -> dict[str, Any]:
        model.check(model_id)
        return card

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
            batch_wait_ms=batch_wait_ms, limits=limits,
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
) -> Iterator[str]:
    """Serve the model in `model_path` from a background thread (uvicorn on a free port of `host`) and yield the
    base URL of its API, e.g. "http://127.0.0.1:40123/v1"; on exit the server finishes its requests and stops.

    For a program that is its own client (a recipe sampling from the teacher it trained): real HTTP on loopback,
    no second process. Access logs are off; uvicorn reports only warnings and errors.
    """
    import uvicorn

    app = create_app(
        model_path, model_name=model_name, device=device, max_batch_size=max_batch_size, batch_wait_ms=batch_wait_ms,
        limits=limits,
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
