"""The teacher an LM cascade escalates to: any OpenAI-compatible endpoint, reached with httpx.

`TeacherEndpoint.post` sends one request and returns its JSON body; `TeacherEndpoint.stream` sends a streaming one
and yields its server-sent events as JSON objects. Whatever goes wrong (the endpoint cannot be reached, times out,
answers an error status, or a body that is not the JSON of a completion) is a `TeacherFailed` naming the endpoint
and the cause, which the server answers as 502 `teacher_failed` (an error event once a stream has started). A
request is tried once: a cascade's client is waiting, and retrying is the client's decision.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx

from distill.serve.requests import APIError

TEACHER_FAILED = "teacher_failed"


class TeacherFailed(APIError):
    """The teacher's endpoint did not give an answer (a 502 in OpenAI's error shape)."""

    def __init__(self, message: str) -> None:
        super().__init__(502, message, TEACHER_FAILED, kind="api_error")


@dataclass
class TeacherEndpoint:
    """An OpenAI-compatible endpoint: `base_url` up to the version (`http://host:8000/v1`), the teacher's model id
    there, an optional API key; `transport` replaces the network (an in-process app: `httpx.ASGITransport`)."""

    base_url: str
    model: str
    api_key: str | None = None
    timeout: float = 300.0
    transport: httpx.AsyncBaseTransport | None = None
    _clients: dict[int, httpx.AsyncClient] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if not self.base_url.startswith(("http://", "https://")):
            raise ValueError(f"the teacher's base URL must start with http:// or https://, not {self.base_url!r}")
        self.base_url = self.base_url.rstrip("/")

    def _client(self) -> httpx.AsyncClient:
        """One client per event loop (a client's connections belong to the loop that opened them)."""
        loop = id(asyncio.get_running_loop())
        if loop not in self._clients:
            headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
            self._clients[loop] = httpx.AsyncClient(
                base_url=self.base_url, headers=headers, timeout=httpx.Timeout(self.timeout, connect=10.0),
                transport=self.transport,
            )  # fmt: skip
        return self._clients[loop]

    async def aclose(self) -> None:
        clients, self._clients = list(self._clients.values()), {}
        for client in clients:
            await client.aclose()

    def failed(self, path: str, cause: str) -> TeacherFailed:
        return TeacherFailed(f"the teacher ({self.model} at {self.base_url}{path}) gave no answer: {cause}")

    async def _check(self, path: str, response: httpx.Response) -> None:
        if response.status_code != 200:
            text = (await response.aread()).decode(errors="replace")
            try:
                detail = json.loads(text)["error"]["message"]
            except (ValueError, KeyError, TypeError):
                detail = text[:200]
            raise self.failed(path, f"HTTP {response.status_code}: {detail}")

    async def post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """One request (`path`: "/completions" or "/chat/completions") with the teacher's model; its JSON body."""
        try:
            response = await self._client().post(path, json=body | {"model": self.model})
            await self._check(path, response)
            data = response.json()
        except httpx.HTTPError as error:
            raise self.failed(path, f"{type(error).__name__}: {error}") from None
        except ValueError:
            raise self.failed(path, "the body is not JSON") from None
        if not isinstance(data, dict) or not isinstance(data.get("choices"), list):
            raise self.failed(path, "the body has no list of choices")
        return data

    @asynccontextmanager
    async def stream(self, path: str, body: dict[str, Any]) -> AsyncIterator[AsyncIterator[dict[str, Any]]]:
        """A streaming request: on entry the answer has started (an error status raised `TeacherFailed` already);
        iterate for its events' JSON (until `[DONE]`; a broken stream raises `TeacherFailed`)."""
        request = self._client().build_request("POST", path, json=body | {"model": self.model, "stream": True})
        try:
            response = await self._client().send(request, stream=True)
        except httpx.HTTPError as error:
            raise self.failed(path, f"{type(error).__name__}: {error}") from None
        try:
            await self._check(path, response)
            yield self._events(path, response)
        finally:
            await response.aclose()

    async def _events(self, path: str, response: httpx.Response) -> AsyncIterator[dict[str, Any]]:
        try:
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    return
                event = json.loads(data)
                if not isinstance(event, dict):
                    raise ValueError("an event is not a JSON object")
                if "error" in event:
                    raise self.failed(path, str(event["error"].get("message", event["error"])))
                yield event
        except httpx.HTTPError as error:
            raise self.failed(path, f"the stream broke: {type(error).__name__}: {error}") from None
        except (ValueError, AttributeError):
            raise self.failed(path, "an event of the stream is not a JSON object") from None
        raise self.failed(path, "the stream ended without [DONE]")
