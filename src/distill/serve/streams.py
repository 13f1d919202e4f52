"""Running a request's rows while watching its client, and streaming them as server-sent events.

A client that disconnects, streaming or not, cancels its generation: its rows stop at the next step of their batch.
A stream sends `data: {chunk}` events in OpenAI's chunk format (chat: a role chunk per choice first) and ends with
`data: [DONE]`; with `stream_options.include_usage` a last chunk with no choices carries the usage. With `echo`, a
choice's first chunk carries the prompt (and its log-probs, and `prompt_logprobs` when asked); a choice that
generates nothing (`max_tokens` 0) sends that one chunk.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from fastapi import Request
from fastapi.responses import StreamingResponse

from distill.batcher import Batcher
from distill.engine import Sequence, TokenLogprob
from distill.serve.responses import Completions, chat_logprobs, usage

Chunk = Callable[[int, str, list[TokenLogprob], str | None], Awaitable[dict[str, Any]]]


def _sse(data: Any) -> str:
    return f"data: {json.dumps(data)}\n\n"


async def _stream(
    batcher: Batcher,
    rows: list[Sequence],
    chunk: Chunk,
    opening: list[dict[str, Any]],
    totals: Callable[[], dict[str, Any]] | None,
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
            yield _sse(await chunk(*event))
    finally:
        if not task.done():
            task.cancel()  # the client left: Batcher.run marks the rows cancelled
    if task.exception() is not None:
        yield _sse(
            {"error": {"message": f"generation failed: {task.exception()}", "type": "server_error", "code": None}}
        )
        return
    if totals is not None:
        yield _sse(totals())
    yield "data: [DONE]\n\n"


async def _disconnect(receive: Callable[[], Awaitable[Any]]) -> None:
    """Returns when the client has gone (after the body, the next ASGI message a server sends is the disconnect)."""
    while (await receive())["type"] != "http.disconnect":
        pass


async def generated(request: Request, batcher: Batcher, rows: list[Sequence]) -> bool:
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


def chat_stream(
    batcher: Batcher, rows: list[Sequence], head: dict[str, Any], top: int | None, prompt_tokens: int, totals: bool
) -> StreamingResponse:
    chunk_head = head | {"object": "chat.completion.chunk"} | ({"usage": None} if totals else {})

    async def chunk(index: int, delta: str, entries: list[TokenLogprob], finish: str | None) -> dict[str, Any]:
        shown = [entry for entry in entries if not entry.end]
        logprobs = chat_logprobs(shown) if top is not None and shown else None
        message = {"content": delta} if delta or finish is None else {}
        choice = {"index": index, "delta": message, "logprobs": logprobs, "finish_reason": finish}
        return chunk_head | {"choices": [choice]}

    role = {"delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
    opening = [chunk_head | {"choices": [{"index": i} | role]} for i in range(len(rows))]
    last = (lambda: chunk_head | {"choices": [], "usage": usage(rows, prompt_tokens)}) if totals else None
    return StreamingResponse(_stream(batcher, rows, chunk, opening, last), media_type="text/event-stream")


def completion_stream(
    batcher: Batcher, rows: list[Sequence], head: dict[str, Any], shape: Completions, totals: bool
) -> StreamingResponse:
    chunk_head = head | ({"usage": None} if totals else {})
    opened: set[int] = set()

    async def chunk(index: int, delta: str, entries: list[TokenLogprob], finish: str | None) -> dict[str, Any]:
        text, echoed, extra = "", None, dict[str, Any]()
        if index not in opened:  # the prompt's pieces come with the choice's first chunk (decoded in a thread)
            opened.add(index)
            text, echoed, extra = await asyncio.to_thread(shape.opening, index, rows)
        logprobs = shape.logprobs(index, entries, echoed) if entries or echoed else None
        choice = {"index": index, "text": text + delta, "logprobs": logprobs, "finish_reason": finish}
        return chunk_head | {"choices": [choice | extra]}

    last = (lambda: chunk_head | {"choices": [], "usage": usage(rows, shape.prompt_tokens())}) if totals else None
    return StreamingResponse(_stream(batcher, rows, chunk, [], last), media_type="text/event-stream")
