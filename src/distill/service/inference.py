"""OpenAI-compatible inference on finished students: `/v1/models`, `/v1/chat/completions`, `/v1/completions`.

Model ids: a finished job's id (`job-...`) serves the model it produced; `job-.../NAME` another of its models
(`job-.../teacher-0`); a deployment's name serves that cascade.

- Causal LM students (Hugging Face folders) are served by `distill.serve`: the request goes, unchanged, to the app
  `serve.create_app` builds for that folder with the service's `Settings.serve_limits` (batching, sampling,
  streaming, log-probs, prompt scoring (`echo`, `prompt_logprobs`, token-id prompts, `max_tokens` 0), limits and
  cancellation on disconnect as `distill serve`).
- MLP/CNN students (`distill run`'s default mnist1d recipe, `distill train`) are classifiers: the last user message
  (chat) or each prompt (completions) is a JSON array of the input's numbers, e.g. the 40 values of an MNIST-1D
  signal; the answer is the predicted class as text, with the class log-probs in OpenAI's `logprobs` format
  (the `top_logprobs` asked for, else all classes up to 20). Sampling fields are accepted and ignored (the answer
  is the arg-max); token-id prompts, `echo` and `prompt_logprobs` are for LM students (400). The same limits
  hold: prompts per request, `n` and prompts x n are checked before any input is parsed (400 `too_many_prompts`,
  `n_too_large`, `too_many_sequences`), and an input is parsed in a worker thread, its JSON nesting bounded (400,
  never a 500).
- A cascade deployment of a classifier answers like a classifier; the student's answer is kept when its confidence
  reaches the deployment's threshold, otherwise the teacher answers. The response header `X-Distill-Answered-By`
  says who (`student`, `teacher`, or `mixed` for several prompts), and so does each choice's `answered_by`. A
  cascade of an LM student is `distill.serve`'s LM cascade (`cascade_lm.py`), with the same header and field.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import torch
from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import ValidationError
from sqlalchemy import Engine
from starlette.concurrency import run_in_threadpool
from starlette.responses import Response
from starlette.types import Receive, Scope, Send
from torch import Tensor

from distill.asgi import MAX_JSON_DEPTH, json_too_deep
from distill.serve import APIError, ChatRequest, CompletionRequest, check_limits
from distill.service import cascade
from distill.service.auth import Principal
from distill.service.deps import require, services
from distill.service.errors import ServiceError
from distill.service.served import LoadedModels, Served, card
from distill.service.settings import Settings

__all__ = ["LoadedModels", "parse_input", "router"]
router = APIRouter(tags=["inference"])
HEADER = "X-Distill-Answered-By"


class Forward(Response):
    """Hands the request, body included, to another ASGI app (distill.serve's), which answers it directly."""

    def __init__(self, app: Any, body: bytes) -> None:
        super().__init__()
        self.app, self.body = app, body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        delivered = False

        async def replay() -> Any:
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": self.body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


def parse_input(text: str, shape: tuple[int, ...], param: str) -> Tensor:
    """A JSON array of numbers (nested or flat) as one input of `shape`; anything else is a 400 naming `param`
    (JSON nested more than `MAX_JSON_DEPTH` deep is refused before it is parsed)."""
    size = int(torch.tensor(shape).prod())
    if json_too_deep(text.encode(), MAX_JSON_DEPTH):
        message = f"{param}: the input nests arrays more than {MAX_JSON_DEPTH} deep; send a flat or shaped array"
        raise ServiceError(400, message, param=param, code="json_too_deep")
    try:
        values = torch.tensor(json.loads(text), dtype=torch.float32)
    except (ValueError, TypeError, RuntimeError, RecursionError):
        values = None
    if values is None or values.numel() != size or not bool(torch.isfinite(values).all()):
        raise ServiceError(
            400,
            f"{param}: must be a JSON array of {size} finite numbers (one input of shape {list(shape)}), "
            f"got {text[:60]!r}",
            param=param,
            code="invalid_input",
        )
    return values.reshape(shape)


@dataclass
class Answer:
    logprobs: Tensor  # (N, C) of whoever answered each row
    answered_by: list[str]


def answer(served: Served, inputs: Tensor, engine: Engine) -> Answer:
    """Classify `inputs` (N, *shape); in a cascade, escalate the rows whose student confidence is too low."""
    assert served.student is not None
    student = served.student.logprobs(inputs)  # (N, C)
    if served.teacher is None or served.threshold is None:
        return Answer(student, ["student"] * len(inputs))
    escalate = student.exp().max(-1).values < served.threshold  # (N,)
    logprobs, agreed = student.clone(), 0
    if bool(escalate.any()):
        teacher = served.teacher.logprobs(inputs[escalate])  # (E, C)
        logprobs[escalate] = teacher
        agreed = int((student[escalate].argmax(-1) == teacher.argmax(-1)).sum())
    cascade.count(engine, served.model_id, len(inputs), int(escalate.sum()), agreed)
    return Answer(logprobs, ["teacher" if e else "student" for e in escalate.tolist()])


def _class_logprobs(row: Tensor, top: int | None) -> dict[str, Any]:
    order = torch.argsort(row, descending=True).tolist()
    count = min(len(order), 20) if top is None else top

    def item(index: int) -> dict[str, Any]:
        token = str(index)
        return {"token": token, "logprob": float(row[index]), "bytes": list(token.encode())}

    return {"content": [item(order[0]) | {"top_logprobs": [item(i) for i in order[:count]]}]}


def _header(answered_by: list[str]) -> str:
    return answered_by[0] if len(set(answered_by)) == 1 else "mixed"


async def _body(request: Request) -> tuple[bytes, dict[str, Any], str]:
    raw = await request.body()  # its size and JSON depth are bounded by the service's RequestGuard
    try:
        payload = json.loads(raw)
    except (ValueError, RecursionError):
        raise ServiceError(400, "the request body is not valid JSON", code="invalid_json") from None
    if not isinstance(payload, dict) or not isinstance(payload.get("model"), str):
        raise ServiceError(422, "model: a model id (string) is required", param="model")
    return raw, payload, payload["model"]


def _check_limits(settings: Settings, prompts: int, n: int) -> None:
    """`serve.check_limits` with the service's limits, as a ServiceError (the service's error handler)."""
    try:
        check_limits(settings.serve_limits, prompts, n, None)
    except APIError as error:
        raise ServiceError(error.status, error.message, param=error.param, code=error.code) from None


def _classifier_texts(body: CompletionRequest, forms: list[str] | list[list[int]]) -> list[str]:
    """A classifier's completions prompts: texts (its inputs as JSON arrays); token ids, `echo` and
    `prompt_logprobs` are for LM students (400)."""
    texts = [text for text in forms if isinstance(text, str)]
    if len(texts) != len(forms):
        message = "prompt: a classifier student reads its inputs as text (JSON arrays of numbers), not token ids"
        raise ServiceError(400, message, param="prompt", code="invalid_input")
    for field in ("echo", "prompt_logprobs"):
        if getattr(body, field) not in (None, False):
            message = f"{field}: classifier students answer a class, they do not score prompts; leave {field} unset"
            raise ServiceError(400, message, param=field, code="invalid_input")
    return texts


def _inputs(texts: list[str], shape: tuple[int, ...], params: list[str]) -> Tensor:
    """(N, *shape): each text parsed by `parse_input` (in a worker thread: a large input takes a while)."""
    return torch.stack([parse_input(text, shape, param) for text, param in zip(texts, params)])


def _validate(model: Any, payload: dict[str, Any]) -> Any:
    try:
        return model.model_validate(payload)
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "body"
        raise ServiceError(422, f"{where}: {first['msg']}", param=where) from None


@router.get("/v1/models")
def list_models(request: Request, _: Principal = Depends(require("infer"))) -> dict[str, Any]:
    return {"object": "list", "data": services(request).models.listing()}


@router.get("/v1/models/{model_id:path}")
def get_model(model_id: str, request: Request, _: Principal = Depends(require("infer"))) -> dict[str, Any]:
    served = services(request).models.resolve(model_id)
    return card(model_id, served.created, "cascade" if served.teacher or served.cascade else "student")


@router.post("/v1/chat/completions", response_model=None)
async def chat_completions(request: Request, _: Principal = Depends(require("infer"))) -> Response:
    svc = services(request)
    raw, payload, model_id = await _body(request)
    served = await run_in_threadpool(svc.models.resolve, model_id)
    if served.app is not None:
        return Forward(served.app, raw)
    body = _validate(ChatRequest, payload)
    _check_limits(svc.settings, 1, body.n or 1)
    users = [m for m in body.messages if m.role == "user"]
    if not users:
        raise ServiceError(422, "messages: needs a user message holding the input", param="messages")
    assert served.student is not None
    inputs = await run_in_threadpool(_inputs, [users[-1].text()], served.student.input_shape, ["messages"])
    result = await run_in_threadpool(answer, served, inputs, svc.engine)
    top = body.top_logprobs if body.logprobs else None
    row, by = result.logprobs[0], result.answered_by[0]
    label = str(int(row.argmax()))
    head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": model_id}
    choices = [
        {
            "index": i,
            "message": {"role": "assistant", "content": label},
            "logprobs": _class_logprobs(row, top),
            "finish_reason": "stop",
            "answered_by": by,
        }
        for i in range(body.n or 1)
    ]
    usage = {"prompt_tokens": int(inputs.numel()), "completion_tokens": len(choices)}
    usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
    headers = {HEADER: by}
    if body.stream:
        return StreamingResponse(_chat_stream(head, choices), media_type="text/event-stream", headers=headers)
    return JSONResponse(head | {"object": "chat.completion", "choices": choices, "usage": usage}, headers=headers)


async def _chat_stream(head: dict[str, Any], choices: list[dict[str, Any]]) -> AsyncIterator[str]:
    """The answer as OpenAI chat chunks: the role, the class with its log-probs, the finish; then [DONE]."""
    chunk = head | {"object": "chat.completion.chunk"}
    for choice in choices:
        pieces = [
            {"delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None},
            {"delta": {"content": choice["message"]["content"]}, "logprobs": choice["logprobs"], "finish_reason": None},
            {"delta": {}, "logprobs": None, "finish_reason": "stop"},
        ]
        for piece in pieces:
            yield f"data: {json.dumps(chunk | {'choices': [{'index': choice['index'], **piece}]})}\n\n"
    yield "data: [DONE]\n\n"


@router.post("/v1/completions", response_model=None)
async def completions(request: Request, _: Principal = Depends(require("infer"))) -> Response:
    svc = services(request)
    raw, payload, model_id = await _body(request)
    served = await run_in_threadpool(svc.models.resolve, model_id)
    if served.app is not None:
        return Forward(served.app, raw)
    body = _validate(CompletionRequest, payload)
    if body.stream:
        raise ServiceError(422, "stream: classifier students answer at once; leave stream unset", param="stream")
    assert served.student is not None
    forms = body.prompts()
    _check_limits(svc.settings, len(forms), body.n or 1)
    texts = _classifier_texts(body, forms)
    params = [f"prompt.{i}" for i in range(len(texts))]
    inputs = await run_in_threadpool(_inputs, texts, served.student.input_shape, params)
    result = await run_in_threadpool(answer, served, inputs, svc.engine)
    choices: list[dict[str, Any]] = []
    for p, (row, by) in enumerate(zip(result.logprobs, result.answered_by)):
        order = torch.argsort(row, descending=True).tolist()
        legacy = {
            "tokens": [str(order[0])],
            "token_logprobs": [float(row[order[0]])],
            "top_logprobs": [{str(i): float(row[i]) for i in order[: body.logprobs or min(len(order), 5)]}],
            "text_offset": [len(texts[p])],
        }
        for _copy in range(body.n or 1):
            choices.append(
                {
                    "index": len(choices),
                    "text": str(order[0]),
                    "logprobs": legacy,
                    "finish_reason": "stop",
                    "answered_by": by,
                }
            )
    usage = {"prompt_tokens": int(inputs.numel()), "completion_tokens": len(choices)}
    usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
    head = {
        "id": f"cmpl-{uuid.uuid4().hex}",
        "object": "text_completion",
        "created": int(time.time()),
        "model": model_id,
    }
    return JSONResponse(head | {"choices": choices, "usage": usage}, headers={HEADER: _header(result.answered_by)})
