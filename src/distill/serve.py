"""`distill serve`: an OpenAI-compatible HTTP server for a local causal LM folder (a student, or any HF model).

Endpoints: `GET /v1/models`, `GET /v1/models/{id}`, `POST /v1/chat/completions`, `POST /v1/completions`, with
OpenAI's request fields `model`, `messages` / `prompt` (a string or a list of strings), `n`, `temperature` (0 is
greedy), `top_p`, `max_tokens` (chat also `max_completion_tokens`), `stop` (up to 4 strings), `seed`, `logprobs`
(chat: a bool and `top_logprobs` 0..20; completions: 0..5 in the legacy `tokens` / `token_logprobs` /
`top_logprobs` / `text_offset` format, offsets counted from the start of the prompt), `stream` and
`stream_options.include_usage`. Other fields are refused (422) rather than silently ignored.

- Unknown model: 404; prompt (plus an explicit `max_tokens`) longer than the model's context: 400. Both carry
  OpenAI's error body `{"error": {"message", "type", "code"}}`; malformed requests get FastAPI's 422.
- `max_tokens` defaults to 16 for completions (as OpenAI's legacy endpoint) and to the rest of the context for chat.
- `completion_tokens` counts the generated tokens, a final end-of-sequence token included.
- With `seed`, choice `i` samples with seed `seed + i`: the same request gives the same choices.
- Chat prompts use the tokenizer's chat template when it has one. Otherwise each message becomes one line
  `System: ...`, `User: ...` or `Assistant: ...` (a `developer` message counts as system), and the prompt ends with
  a final line `Assistant:`; the reply is what the model writes after it.

Concurrent requests are batched (see `distill.sampling`); streaming sends `data: {chunk}` server-sent events in
OpenAI's chunk format and ends with `data: [DONE]`.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, model_validator

from distill.asgi import ServeLimits  # noqa: F401 - the serve limits, used by create_app
from distill.errors import DistillError
from distill.sampling import Batcher, Engine, SamplingParams, Sequence, TokenLogprob
from distill.teachers.hf import load_causal_lm, load_tokenizer

ROLE_NAMES = {"system": "System", "developer": "System", "user": "User", "assistant": "Assistant"}
TOO_LONG = "context_length_exceeded"
StopText = Annotated[str, Field(min_length=1)]


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str
    n: int | None = Field(None, ge=1, le=128)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    max_tokens: int | None = Field(None, ge=1)
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


class CompletionRequest(_Request):
    prompt: str | Annotated[list[str], Field(min_length=1)]
    logprobs: int | None = Field(None, ge=0, le=5)


class APIError(Exception):
    """An error answered with OpenAI's error body."""

    def __init__(self, status: int, message: str, code: str, kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.kind = status, message, code, kind


def _error_response(_: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, APIError)
    body = {"message": error.message, "type": error.kind, "param": None, "code": error.code}
    return JSONResponse({"error": body}, status_code=error.status)


def chat_prompt(tokenizer: Any, messages: list[Message]) -> tuple[str, bool]:
    """The prompt text for `messages`, and whether the tokenizer should still add its special tokens."""
    if getattr(tokenizer, "chat_template", None):
        turns = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in messages]
        return str(tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)), False
    lines = [f"{ROLE_NAMES[m.role]}: {m.text()}" for m in messages]
    return "\n".join([*lines, "Assistant:"]), True


def _seed(seed: int | None, choice: int) -> int | None:
    return None if seed is None else (seed + choice) % 2**63


def _rows(
    engine: Engine,
    prompts: list[list[int]],
    body: _Request,
    max_tokens: int | None,
    default: int | None,
    top: int | None,
) -> list[Sequence]:
    """One `Sequence` per prompt and choice (prompt-major, as OpenAI numbers the choices).

    An explicit `max_tokens` must fit in the context; the default (None: the whole context) is cut to fit."""
    rows = []
    for ids in prompts:
        room = engine.context - len(ids)
        prompt = f"the prompt is {len(ids)} tokens and this model's context is {engine.context} tokens"
        if room < 1:
            raise APIError(400, f"{prompt}: no room is left for a completion; shorten the prompt", TOO_LONG)
        if max_tokens is not None and max_tokens > room:
            raise APIError(400, f"{prompt}: max_tokens {max_tokens} does not fit; ask for at most {room}", TOO_LONG)
        for choice in range(body.n or 1):
            params = SamplingParams(
                max_tokens=max_tokens or min(default or room, room),
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


async def _stream(
    batcher: Batcher,
    rows: list[Sequence],
    chunk: Callable[[int, str, list[TokenLogprob], str | None], dict[str, Any]],
    opening: list[dict[str, Any]],
    usage: Callable[[], dict[str, Any]] | None,
) -> AsyncIterator[str]:
    """Server-sent events: `opening` chunks, one chunk per settled piece of text, the usage chunk, [DONE]."""
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
    for data in opening:
        yield _sse(data)
    while (event := await events.get()) is not None:
        yield _sse(chunk(*event))
    if task.exception() is not None:
        yield _sse(
            {"error": {"message": f"generation failed: {task.exception()}", "type": "server_error", "code": None}}
        )
        return
    if usage is not None:
        yield _sse(usage())
    yield "data: [DONE]\n\n"


def create_app(
    model_path: str | Path,
    *,
    model_name: str | None = None,
    device: str = "cpu",
    max_batch_size: int = 16,
    batch_wait_ms: float = 5.0,
) -> FastAPI:
    """The FastAPI app serving the causal LM in `model_path` (save_pretrained layout, with its tokenizer)."""
    if max_batch_size < 1 or batch_wait_ms < 0:
        raise DistillError(f"max_batch_size must be >= 1 and batch_wait_ms >= 0, not {max_batch_size}, {batch_wait_ms}")
    tokenizer = load_tokenizer(model_path)
    try:
        engine = Engine(load_causal_lm(model_path), tokenizer, device)
    except (RuntimeError, ValueError) as error:
        raise DistillError(f"cannot serve {model_path} on {device}: {str(error).splitlines()[0]}") from None
    batcher = Batcher(engine, max_batch_size, batch_wait_ms)
    name, created = model_name or Path(str(model_path)).name, int(time.time())
    card = {"id": name, "object": "model", "created": created, "owned_by": "distill"}

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        await batcher.close()

    app = FastAPI(title=f"distill serve: {name}", lifespan=lifespan)
    app.add_exception_handler(APIError, _error_response)

    def check_model(requested: str) -> None:
        if requested != name:
            message = f"the model {requested!r} does not exist; this server serves {name!r}"
            raise APIError(404, message, "model_not_found")

    @app.get("/v1/models")
    def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [card]}

    @app.get("/v1/models/{model_id:path}")
    def get_model(model_id: str) -> dict[str, Any]:
        check_model(model_id)
        return card

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(body: ChatRequest) -> dict[str, Any] | StreamingResponse:
        check_model(body.model)
        text, special = chat_prompt(tokenizer, body.messages)
        prompt = engine.encode(text, special_tokens=special)
        top = (body.top_logprobs or 0) if body.logprobs else None
        rows = _rows(engine, [prompt], body, body.max_completion_tokens or body.max_tokens, None, top)
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": name}
        include_usage = body.stream_options is not None and body.stream_options.include_usage
        if body.stream:
            chunk_head = head | {"object": "chat.completion.chunk"} | ({"usage": None} if include_usage else {})

            def chunk(index: int, delta: str, entries: list[TokenLogprob], finish: str | None) -> dict[str, Any]:
                logprobs = _chat_logprobs(entries) if top is not None and entries else None
                message = {"content": delta} if delta or finish is None else {}
                choice = {"index": index, "delta": message, "logprobs": logprobs, "finish_reason": finish}
                return chunk_head | {"choices": [choice]}

            role = {"delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
            opening = [chunk_head | {"choices": [{"index": i} | role]} for i in range(len(rows))]
            usage = (
                (lambda: chunk_head | {"choices": [], "usage": _usage(rows, len(prompt))}) if include_usage else None
            )
            return StreamingResponse(_stream(batcher, rows, chunk, opening, usage), media_type="text/event-stream")
        await batcher.run(rows)
        choices = [
            {
                "index": i,
                "message": {"role": "assistant", "content": row.text},
                "logprobs": _chat_logprobs(row.logprobs) if top is not None else None,
                "finish_reason": row.finish_reason,
            }
            for i, row in enumerate(rows)
        ]
        return head | {"object": "chat.completion", "choices": choices, "usage": _usage(rows, len(prompt))}

    @app.post("/v1/completions", response_model=None)
    async def completions(body: CompletionRequest) -> dict[str, Any] | StreamingResponse:
        check_model(body.model)
        texts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        prompts = [engine.encode(text) for text in texts]
        rows = _rows(engine, prompts, body, body.max_tokens, 16, body.logprobs)
        starts = [len(texts[i // (body.n or 1)]) for i in range(len(rows))]  # legacy text_offset counts the prompt
        prompt_tokens = sum(len(ids) for ids in prompts)
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time())}
        head["model"] = name
        want = body.logprobs is not None
        if body.stream:
            include_usage = body.stream_options is not None and body.stream_options.include_usage
            chunk_head = head | ({"usage": None} if include_usage else {})

            def chunk(index: int, delta: str, entries: list[TokenLogprob], finish: str | None) -> dict[str, Any]:
                logprobs = _legacy_logprobs(entries, starts[index]) if want and entries else None
                choice = {"index": index, "text": delta, "logprobs": logprobs, "finish_reason": finish}
                return chunk_head | {"choices": [choice]}

            usage = (
                (lambda: chunk_head | {"choices": [], "usage": _usage(rows, prompt_tokens)}) if include_usage else None
            )
            return StreamingResponse(_stream(batcher, rows, chunk, [], usage), media_type="text/event-stream")
        await batcher.run(rows)
        choices = [
            {
                "index": i,
                "text": row.text,
                "logprobs": _legacy_logprobs(row.logprobs, starts[i]) if want else None,
                "finish_reason": row.finish_reason,
            }
            for i, row in enumerate(rows)
        ]
        return head | {"choices": choices, "usage": _usage(rows, prompt_tokens)}

    return app


def serve(
    model_path: str | Path,
    host: str = "127.0.0.1",
    port: int = 8000,
    *,
    model_name: str | None = None,
    device: str = "cpu",
    max_batch_size: int = 16,
    batch_wait_ms: float = 5.0,
    log_level: str = "info",
) -> None:
    """Serve the model in `model_path` over HTTP until interrupted (uvicorn, one process)."""
    import uvicorn

    app = create_app(
        model_path, model_name=model_name, device=device, max_batch_size=max_batch_size, batch_wait_ms=batch_wait_ms
    )
    uvicorn.run(app, host=host, port=port, log_level=log_level)


@contextmanager
def serve_in_thread(
    model_path: str | Path,
    *,
    model_name: str | None = None,
    device: str = "cpu",
    max_batch_size: int = 16,
    batch_wait_ms: float = 5.0,
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
        model_path, model_name=model_name, device=device, max_batch_size=max_batch_size, batch_wait_ms=batch_wait_ms
    )
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((host, 0))  # port 0: the system picks a free one, held from here on (no race with others)
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
