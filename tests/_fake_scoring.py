"""A fake OpenAI-compatible server that scores prompts given as token ids with a real (tiny) causal LM, in the two
formats `distill.teachers.served_cache` asks for: vLLM's `prompt_logprobs` and OpenAI's legacy `echo` + `logprobs`
with `max_tokens: 0`.

    app = scoring_app(model, tokenizer, formats=("echo",))
    client = TeacherClient("http://fake/v1", "tiny", transport=httpx.ASGITransport(app=app))
    app.state.prompts      # the token ids of every scoring request, in arrival order

Settings: `formats` it answers; a request for another is refused with 400 (`unsupported="refuse"`, as strict servers
do) or answered as a plain completion without the log-probs (`"ignore"`, as lenient ones do); `fail_after` answers
`fail_status` to every scoring request after that many; `texts` is the tokenizer whose token texts it reports (the
model's by default; another one makes a server with another vocabulary); `cap` is the most alternatives it gives
(like an API's limit of 20): asked for more, it refuses with 400, or with `truncate` gives `cap`; `decoded_alone`
reports each token's `decoded_token` as the token decoded on its own (vLLM's V1 engine) instead of the text it adds
after the tokens before it (vLLM's V0); `delay` holds each request that long (`app.state.max_in_flight` counts the
requests held at once).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from distill.engine import added_text


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": "fake", "code": status}}, status_code=status)


def _logprobs(model: Any, ids: list[int]) -> torch.Tensor:
    """(T, V) log-probs: row j - 1 is the distribution of token j."""
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([ids])).logits[0]  # (T, V)
    return F.log_softmax(logits.float(), -1)


def _prompt_logprobs(logprobs: torch.Tensor, ids: list[int], k: int, texts: Any, alone: bool) -> list[Any]:
    entries: list[Any] = [None]
    for j in range(1, len(ids)):
        row = logprobs[j - 1]  # (V,)
        top = row.topk(k).indices.tolist()
        entry = {}
        for token in [*top, ids[j]]:
            rank = int((row > row[token]).sum()) + 1
            text = texts.decode([token]) if alone else added_text(texts, ids[:j], token)
            entry[str(token)] = {"logprob": float(row[token]), "rank": rank, "decoded_token": text}
        entries.append(entry)
    return entries


def _echo(logprobs: torch.Tensor, ids: list[int], k: int, texts: Any) -> dict[str, Any]:
    tokens = [added_text(texts, ids[:j], ids[j]) for j in range(len(ids))]
    values: list[float | None] = [None]
    tops: list[dict[str, float] | None] = [None]
    for j in range(1, len(ids)):
        row = logprobs[j - 1]  # (V,)
        values.append(float(row[ids[j]]))
        top = row.topk(k)
        tops.append({added_text(texts, ids[:j], t): float(v) for t, v in zip(top.indices.tolist(), top.values)})
    offsets = [sum(len(t) for t in tokens[:j]) for j in range(len(tokens))]
    return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}


def scoring_app(
    model: Any,
    tokenizer: Any,
    *,
    formats: tuple[str, ...] = ("prompt_logprobs", "echo"),
    unsupported: str = "refuse",
    fail_after: int | None = None,
    fail_status: int = 400,
    texts: Any = None,
    cap: int = 20,
    truncate: bool = False,
    decoded_alone: bool = False,
    delay: float = 0.0,
    scores_alone: bool = True,
) -> FastAPI:
    app = FastAPI()
    app.state.prompts = []
    app.state.keys = set()  # the Authorization headers seen
    app.state.in_flight = app.state.max_in_flight = 0
    texts = texts if texts is not None else tokenizer

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        body = await request.json()
        ids = body.get("prompt")
        if not isinstance(ids, list) or not all(isinstance(i, int) for i in ids):
            return _error(400, "prompt must be a list of token ids here")
        wanted = "prompt_logprobs" if body.get("prompt_logprobs") is not None else "echo" if body.get("echo") else None
        app.state.prompts.append(ids)
        app.state.keys.add(request.headers.get("authorization"))
        app.state.in_flight += 1
        app.state.max_in_flight = max(app.state.max_in_flight, app.state.in_flight)
        await asyncio.sleep(delay)
        app.state.in_flight -= 1
        if fail_after is not None and len(app.state.prompts) > fail_after:
            return _error(fail_status, "injected failure")
        if wanted not in formats and unsupported == "refuse":
            return _error(400, f"{wanted or 'this request'} is not supported")
        if wanted == "prompt_logprobs" and body.get("max_tokens") == 0 and not scores_alone:  # as vLLM
            return _error(400, "max_tokens must be at least 1")
        k = int(body.get("prompt_logprobs") or body.get("logprobs") or 0)
        if k > cap and not truncate:
            return _error(400, f"at most {cap} log-probs")
        k = min(k, cap)
        logprobs = _logprobs(model, ids)
        choice: dict[str, Any] = {"index": 0, "text": "", "logprobs": None, "finish_reason": "length"}
        if wanted == "prompt_logprobs" and wanted in formats:
            choice["prompt_logprobs"] = _prompt_logprobs(logprobs, ids, k, texts, decoded_alone)
            choice["text"] = texts.decode([int(logprobs[-1].argmax())])
        elif wanted == "echo" and wanted in formats:
            choice["logprobs"] = _echo(logprobs, ids, k, texts)
            choice["text"] = "".join(choice["logprobs"]["tokens"])
        completion = int(body.get("max_tokens") or 0)
        usage = {"prompt_tokens": len(ids), "completion_tokens": completion, "total_tokens": len(ids) + completion}
        return {"id": "cmpl-fake", "object": "text_completion", "created": int(time.time()), "model": body["model"],
                "choices": [choice], "usage": usage}  # fmt: skip

    return app


@contextlib.contextmanager
def serve_app(app: FastAPI) -> Iterator[str]:
    """The app on a free loopback port from a thread (uvicorn); yields its base URL, ".../v1"."""
    import socket

    import uvicorn

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [listener]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            if time.monotonic() > deadline or not thread.is_alive():
                raise RuntimeError("the fake scoring server did not start")
            time.sleep(0.01)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        listener.close()
