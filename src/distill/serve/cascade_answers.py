"""The answers of an LM cascade (`serve.cascade`) to chat and completions requests: the student's choices, the
teacher's, or both, as one JSON response or as server-sent events."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack
from typing import Any

from fastapi import Request
from fastapi.responses import Response, StreamingResponse

from distill.batcher import Batcher
from distill.engine import Sequence as Row
from distill.lm_confidence import same_answer
from distill.serve.cascade import HEADER, Cascade, Student, decide, prepare
from distill.serve.escalate import TeacherFailed
from distill.serve.requests import ChatRequest, CompletionRequest, SamplingRequest
from distill.serve.responses import CLIENT_GONE, Completions, FastJSON, chat_choice, chat_logprobs, usage
from distill.serve.streams import generated

Chunk = dict[str, Any]


def _sse(data: Any) -> str:
    return f"data: {json.dumps(data)}\n\n"


def _payload(body: SamplingRequest) -> dict[str, Any]:
    """The request as the teacher gets it (its own model id is added by the endpoint)."""
    return body.model_dump(exclude_none=True, exclude={"model"})


def _teacher_choices(cascade: Cascade, data: dict[str, Any], path: str) -> list[dict[str, Any]]:
    choices = data["choices"]
    if not all(isinstance(c, dict) and isinstance(c.get("index"), int) for c in choices):
        raise cascade.teacher.failed(path, "a choice is not an object with an index")
    return sorted(choices, key=lambda c: c["index"])


def _answer_text(choice: dict[str, Any]) -> str:
    message = choice.get("message") or choice.get("delta") or {}
    text = choice.get("text", message.get("content") if isinstance(message, dict) else "")
    return text if isinstance(text, str) else ""


async def _student_answers(
    cascade: Cascade, batcher: Batcher, rows: list[Row], n: int, seed: int | None, request: Request
) -> Student | None:
    """The student's rows generated (with the samples the measure needs) and the decision; None: the client left."""
    work = prepare(cascade, rows, n, seed)
    if not await generated(request, batcher, work):
        return None
    return decide(cascade, work, len(rows), n)


Totals = Callable[[dict[str, Any] | None], Chunk]  # the usage chunk, from the teacher's usage (or None)


def _stream(
    cascade: Cascade, opening: list[Chunk], relay: Any, head: Chunk, totals: Totals | None,
    agree: Callable[[dict[int, str]], int], header: str,
) -> StreamingResponse:  # fmt: skip
    """Server-sent events: the `opening` chunks (the student's), then the teacher's relayed with `relay`'s index map
    (None: no teacher), then the usage chunk (`totals` of the teacher's usage) and [DONE]."""

    async def events() -> AsyncIterator[str]:
        teacher_usage, texts = None, dict[int, str]()
        try:
            for chunk in opening:
                yield _sse(chunk)
            if relay is not None:
                remap, stream = relay
                async for event in stream:
                    if not event.get("choices"):
                        teacher_usage = event.get("usage") or teacher_usage
                        continue
                    choices = [c | {"index": remap(int(c.get("index", 0)))} for c in event["choices"]]
                    for choice in choices:
                        texts[choice["index"]] = texts.get(choice["index"], "") + _answer_text(choice)
                    yield _sse(head | {"choices": choices})
                await cascade.count(0, 0, agree(texts))
            if totals is not None:
                yield _sse(totals(teacher_usage))
            yield "data: [DONE]\n\n"
        except TeacherFailed as error:
            yield _sse({"error": {"message": error.message, "type": error.kind, "code": error.code}})

    return StreamingResponse(events(), media_type="text/event-stream", headers={HEADER: header})


async def _teacher_stream(
    cascade: Cascade, path: str, payload: dict[str, Any], remap: Callable[[int], int], stack: AsyncExitStack
) -> tuple[Callable[[int], int], Any]:
    """The teacher's stream, started (a failure to start is a 502 before any byte is sent), closed with `stack`."""
    events = await stack.enter_async_context(cascade.teacher.stream(path, payload))
    return remap, events


def _closing(response: StreamingResponse, stack: AsyncExitStack) -> StreamingResponse:
    """`response` that closes `stack` (the teacher's stream) once it has been sent, or abandoned."""
    body = response.body_iterator

    async def closed() -> AsyncIterator[Any]:
        try:
            async for part in body:
                yield part
        finally:
            await stack.aclose()

    response.body_iterator = closed()
    return response


def _agreement(cascade: Cascade, student: Student, up: list[int]) -> Callable[[dict[int, str]], int]:
    """How many escalated prompts the student answered as the teacher did, from the teacher's texts by choice
    index (the first choice of each prompt compared)."""
    answers = cascade.setup.confidence.answers

    def agreed(texts: dict[int, str]) -> int:
        return sum(same_answer(student.rows[p * student.n].text, texts.get(p * student.n, ""), answers) for p in up)

    return agreed


async def chat(
    cascade: Cascade, batcher: Batcher, rows: list[Row], body: ChatRequest, head: Chunk, top: int | None,
    prompt_tokens: int, request: Request,
) -> Response:  # fmt: skip
    """POST /v1/chat/completions through the cascade (the rows of the one prompt, n choices)."""
    student = await _student_answers(cascade, batcher, rows, len(rows), body.seed, request)
    if student is None:
        return Response(status_code=CLIENT_GONE)
    escalated = student.escalate[0]
    await cascade.count(1, int(escalated), 0)
    agree = _agreement(cascade, student, [0] if escalated else [])
    chunk_head = head | {"object": "chat.completion.chunk"} | ({"usage": None} if body.include_usage() else {})
    if not escalated and body.stream:
        return _stream(cascade, _chat_chunks(chunk_head, rows, top), None, chunk_head,
                       _usage_chunk(chunk_head, usage(rows, prompt_tokens), None) if body.include_usage() else None,
                       agree, "student")  # fmt: skip
    if not escalated:
        choices = [chat_choice(i, row, top) | {"answered_by": "student"} for i, row in enumerate(rows)]
        content = head | {"object": "chat.completion", "choices": choices, "usage": usage(rows, prompt_tokens)}
        return FastJSON(content, headers={HEADER: "student"})
    path, payload = "/chat/completions", _payload(body)
    if body.stream:
        stack = AsyncExitStack()
        relay = await _teacher_stream(cascade, path, payload, lambda i: i, stack)
        totals = _usage_chunk(chunk_head, None, prompt_tokens) if body.include_usage() else None
        return _closing(_stream(cascade, [], relay, chunk_head, totals, agree, "teacher"), stack)
    data = await cascade.teacher.post(path, payload)
    choices = [c | {"answered_by": "teacher"} for c in _teacher_choices(cascade, data, path)]
    await cascade.count(0, 0, agree({c["index"]: _answer_text(c) for c in choices}))
    content = head | {"object": "chat.completion", "choices": choices, "usage": data.get("usage")}
    return FastJSON(content, headers={HEADER: "teacher"})


def _chat_chunks(chunk_head: Chunk, rows: list[Row], top: int | None) -> list[Chunk]:
    """A finished chat answer as stream chunks: per choice, the role, the content (with its log-probs), the end."""
    chunks = []
    for i, row in enumerate(rows):
        logprobs = chat_logprobs(row.logprobs) if top is not None else None
        pieces: list[dict[str, Any]] = [
            {"delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None},
            {"delta": {"content": row.text}, "logprobs": logprobs, "finish_reason": None},
            {"delta": {}, "logprobs": None, "finish_reason": row.finish_reason},
        ]
        chunks += [chunk_head | {"choices": [{"index": i} | piece]} for piece in pieces]
    return chunks


def _usage_chunk(chunk_head: Chunk, student: dict[str, int] | None, prompt_tokens: int | None) -> Totals:
    """The last chunk's usage: the student's (`student`), plus the completion tokens the teacher reported."""

    def totals(teacher: dict[str, Any] | None) -> Chunk:
        base = student or {"prompt_tokens": prompt_tokens or 0, "completion_tokens": 0}
        extra = int((teacher or {}).get("completion_tokens") or 0)
        done = {"prompt_tokens": base["prompt_tokens"], "completion_tokens": base["completion_tokens"] + extra}
        return chunk_head | {"choices": [], "usage": done | {"total_tokens": sum(done.values())}}

    return totals


async def complete(
    cascade: Cascade, batcher: Batcher, rows: list[Row], body: CompletionRequest, head: Chunk, shape: Completions,
    request: Request,
) -> Response:  # fmt: skip
    """POST /v1/completions through the cascade: the confident prompts keep the student's choices, the others get
    the teacher's (one request for all of them)."""
    n = shape.n
    student = await _student_answers(cascade, batcher, rows, n, body.seed, request)
    if student is None:
        return Response(status_code=CLIENT_GONE)
    up = [p for p, escalate in enumerate(student.escalate) if escalate]
    await cascade.count(len(student.escalate), len(up), 0)
    kept = [i for i in range(len(rows)) if not student.escalate[i // n]]
    mine = [shape.choice(i, rows) | {"answered_by": "student"} for i in kept]
    own = usage([rows[i] for i in kept], shape.prompt_tokens())

    def remap(index: int) -> int:  # the teacher's choice index -> this request's
        return up[index // n] * n + index % n if 0 <= index < len(up) * n else index

    chunk_head = head | ({"usage": None} if body.include_usage() else {})
    totals = _usage_chunk(chunk_head, own, None) if body.include_usage() else None
    path, payload = "/completions", _payload(body) | {"prompt": [shape.prompts[p].text for p in up]}
    agree = _agreement(cascade, student, up)
    if body.stream:
        opening = [chunk_head | {"choices": [choice]} for choice in mine]
        if not up:
            return _stream(cascade, opening, None, chunk_head, totals, agree, student.header())
        stack = AsyncExitStack()
        relay = await _teacher_stream(cascade, path, payload, remap, stack)
        return _closing(_stream(cascade, opening, relay, chunk_head, totals, agree, student.header()), stack)
    if up:
        data = await cascade.teacher.post(path, payload)
        theirs = [c | {"index": remap(c["index"]), "answered_by": "teacher"}
                  for c in _teacher_choices(cascade, data, path)]  # fmt: skip
        await cascade.count(0, 0, agree({c["index"]: _answer_text(c) for c in theirs}))
        mine = sorted(mine + theirs, key=lambda c: c["index"])
        extra = int((data.get("usage") or {}).get("completion_tokens") or 0)
        own = own | {"completion_tokens": own["completion_tokens"] + extra}
        own["total_tokens"] = own["prompt_tokens"] + own["completion_tokens"]
    return FastJSON(head | {"choices": mine, "usage": own}, headers={HEADER: student.header()})
