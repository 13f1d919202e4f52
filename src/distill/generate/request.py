"""One request to a teacher for samples of a prompt: how it samples (`RequestParams`), the content hash that
names each sample (`sample_id`), and the request itself (`ask`)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

from distill.generate.client import Completion, TeacherClient
from distill.generate.prompts import PromptRecord

Endpoint = Literal["chat", "completions"]


@dataclass(frozen=True)
class RequestParams:
    """How the teacher samples. `top_logprobs`: None keeps no log-probs, 0 the sampled tokens', K > 0 also the top K.
    With a `seed`, a request for samples i.. uses seed + i, so samples asked one per request differ."""

    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int | None = None
    stop: tuple[str, ...] = ()
    seed: int | None = None
    top_logprobs: int | None = None


def sample_id(record: PromptRecord, model: str, params: RequestParams, endpoint: Endpoint, index: int) -> str:
    """The content hash that names one sample."""
    key = {
        "prompt": record.prompt,
        "messages": None if record.messages is None else [list(m) for m in record.messages],
        "model": model,
        "endpoint": endpoint,
        "params": asdict(params),
        "sample": index,
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


async def ask(
    client: TeacherClient, endpoint: Endpoint, record: PromptRecord, params: RequestParams, indices: Sequence[int]
) -> list[Completion]:
    """One request for the samples `indices` of a prompt (`len(indices)` choices; with a seed, seed + indices[0])."""
    seed = None if params.seed is None else params.seed + indices[0]
    options: dict[str, Any] = {
        "n": len(indices),
        "temperature": params.temperature,
        "top_p": params.top_p,
        "max_tokens": params.max_tokens,
        "stop": list(params.stop) or None,
        "seed": seed,
        "top_logprobs": params.top_logprobs,
    }
    if endpoint == "completions":
        return await client.complete(record.text, **options)
    return await client.chat(messages(record), **options)


def messages(record: PromptRecord) -> list[dict[str, str]]:
    """The chat messages of a record: its conversation, or its prompt as one user message."""
    if record.messages is not None:
        return [{"role": role, "content": content} for role, content in record.messages]
    return [{"role": "user", "content": record.prompt or ""}]
