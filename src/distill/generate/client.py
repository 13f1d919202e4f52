"""A remote teacher behind any OpenAI-compatible HTTP API (OpenAI, vLLM, SGLang, llama.cpp, Together, ...).

`TeacherClient` is an async client for `/chat/completions` and `/completions`. It bounds the number of requests in
flight, retries what is worth retrying and counts what the run cost:

- retried: HTTP 408, 409, 429 and 5xx, timeouts, connection errors, and a 200 whose body is not the expected JSON
  (at most `max_malformed` times per request);
- the wait before retry k (0-based) is `backoff * 2**k` capped at `max_backoff`, with jitter (half fixed, half
  random), unless the server says how long to wait (`Retry-After` in seconds or as an HTTP date, `retry-after-ms`);
- other 4xx (a wrong key, an unknown model, a bad parameter) fail at once: retrying cannot fix them;
- after `max_retries` retries a `TeacherClientError` names the URL, the attempts and the last error.

The API key is an argument: library code does not read the environment (the CLI does). An `TeacherClient` may be used
from one event loop at a time; `aclose()` releases its connections (the next request opens new ones).
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import random
import ssl
import time
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import httpx

from distill.errors import DistillError

RETRY_STATUSES = frozenset({408, 409, 429})
T = TypeVar("T")
POOL_SIZE = 4
"""Connections per httpx pool (see `TeacherClient._bind`)."""


class TeacherClientError(DistillError):
    """A request to a teacher API failed for good (`retryable` is False when retrying could not have helped)."""

    def __init__(self, message: str, *, status: int | None = None, retryable: bool = True):
        super().__init__(message)
        self.status = status
        self.retryable = retryable


@dataclass(frozen=True)
class Prices:
    """Prices in the currency of your bill (e.g. USD) per one million prompt (input) and completion (output) tokens."""

    input_per_million: float = 0.0
    output_per_million: float = 0.0

    def cost(self, prompt_tokens: int, completion_tokens: int) -> float:
        return (prompt_tokens * self.input_per_million + completion_tokens * self.output_per_million) / 1e6


@dataclass
class Usage:
    """Running totals of one client: `requests` succeeded, `failures` gave up, `retries` were extra attempts."""

    requests: int = 0
    retries: int = 0
    failures: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost: float = 0.0
    missing_usage: int = 0
    """Responses without a `usage` object: their tokens and cost are not in the totals."""

    def snapshot(self) -> Usage:
        return Usage(**self.__dict__)

    def since(self, earlier: Usage) -> Usage:
        """The totals accumulated after `earlier` (a snapshot) was taken."""
        return Usage(**{k: v - getattr(earlier, k) for k, v in self.__dict__.items()})


@dataclass
class TokenLogprobs:
    """Log-probabilities of a completion's tokens, as far as the server offered them.

    tokens:   the sampled tokens (as text)
    logprobs: (T,) log-probability of each sampled token
    top:      (T, K) the K most likely alternatives at each position as (token, logprob) pairs; None when not asked for
    """

    tokens: list[str]
    logprobs: list[float]
    top: list[list[tuple[str, float]]] | None = None

    def to_json(self) -> dict[str, Any]:
        top = None if self.top is None else [[[t, lp] for t, lp in position] for position in self.top]
        return {"tokens": self.tokens, "logprobs": self.logprobs, "top": top}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> TokenLogprobs:
        top = data.get("top")
        pairs = None if top is None else [[(str(t), float(lp)) for t, lp in position] for position in top]
        return cls(list(data["tokens"]), [float(x) for x in data["logprobs"]], pairs)


@dataclass
class Completion:
    """One choice of a response.

    `prompt_tokens` is the request's prompt length. `completion_tokens` is this choice's length when the server
    returned its log-probs, otherwise the response's total split evenly over its choices. `cost` is this choice's
    share of the request's cost (its own completion tokens plus 1/n of the prompt's cost).
    """

    text: str
    finish_reason: str | None
    logprobs: TokenLogprobs | None = None
    reasoning: str | None = None
    """A separate reasoning trace (`reasoning_content` of DeepSeek-R1-style servers), when the server sends one."""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost: float = 0.0
    choice: Mapping[str, Any] | None = None
    """The choice as the server sent it (`complete_raw` only): for answers this class does not model."""


_Parse = Callable[[Mapping[str, Any]], Completion]


@dataclass
class _Retry:
    reason: str
    wait: float | None = None  # what the server asked for, seconds
    malformed: bool = False


@dataclass
class TeacherClient:
    """An OpenAI-compatible endpoint as a teacher that writes text (and, when offered, token log-probs).

    base_url:     up to and including the version, e.g. `https://api.openai.com/v1` or `http://localhost:8000/v1`
    concurrency:  requests in flight at most (also the size of the connection pool)
    timeout:      seconds for a whole response to arrive; `connect_timeout` for opening a connection
    max_retries:  extra attempts per request before giving up; `max_malformed` of them may be for malformed bodies
    backoff:      the first retry's wait in seconds, doubled each retry up to `max_backoff`; a server's Retry-After
                  is honoured up to `max_retry_after`
    """

    base_url: str
    model: str
    api_key: str | None = None
    concurrency: int = 16
    timeout: float = 120.0
    connect_timeout: float = 10.0
    max_retries: int = 6
    max_malformed: int = 2
    backoff: float = 0.5
    max_backoff: float = 30.0
    max_retry_after: float = 300.0
    prices: Prices = field(default_factory=Prices)
    headers: Mapping[str, str] = field(default_factory=dict)
    transport: httpx.AsyncBaseTransport | None = None
    seed: int | None = None
    """Seeds the backoff jitter (tests); None draws it from the system."""

    def __post_init__(self) -> None:
        if self.concurrency < 1:
            raise DistillError(f"teacher API concurrency must be at least 1, got {self.concurrency}")
        if self.max_retries < 0 or self.max_malformed < 0:
            raise DistillError("max_retries and max_malformed must not be negative")
        if not self.base_url.startswith(("http://", "https://")):
            raise DistillError(f"teacher API base_url must start with http:// or https://, got {self.base_url!r}")
        self.usage = Usage()
        self._random = random.Random(self.seed)
        self._pools: list[httpx.AsyncClient] = []
        self._free: list[int] = []
        self._semaphore: asyncio.Semaphore | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    # ------------------------------------------------------------------------------------------------------------
    # Public calls
    # ------------------------------------------------------------------------------------------------------------

    async def chat(
        self,
        messages: Sequence[Mapping[str, Any]],
        n: int = 1,
        temperature: float = 1.0,
        top_p: float = 1.0,
        max_tokens: int | None = None,
        stop: Sequence[str] | None = None,
        seed: int | None = None,
        top_logprobs: int | None = None,
    ) -> list[Completion]:
        """`n` answers to a conversation. `top_logprobs`: None asks for no log-probs, 0 for the sampled tokens'
        only, K > 0 also for the K most likely alternatives at each position."""
        body: dict[str, Any] = {"model": self.model, "messages": [dict(m) for m in messages]}
        body.update(_sampling(n, temperature, top_p, max_tokens, stop, seed))
        if top_logprobs is not None:
            body["logprobs"] = True
            if top_logprobs > 0:
                body["top_logprobs"] = top_logprobs
        return await self._post("/chat/completions", body, n, _chat_choice)

    async def complete(
        self,
        prompt: str,
        n: int = 1,
        temperature: float = 1.0,
        top_p: float = 1.0,
        max_tokens: int | None = None,
        stop: Sequence[str] | None = None,
        seed: int | None = None,
        top_logprobs: int | None = None,
    ) -> list[Completion]:
        """`n` continuations of a raw prompt (the legacy `/completions` endpoint, which vLLM and others serve)."""
        body: dict[str, Any] = {"model": self.model, "prompt": prompt}
        body.update(_sampling(n, temperature, top_p, max_tokens, stop, seed))
        if top_logprobs is not None:
            body["logprobs"] = top_logprobs
        return await self._post("/completions", body, n, _text_choice)

    async def complete_raw(self, body: Mapping[str, Any]) -> Completion:
        """One `/completions` request with the caller's own fields (the model is added), retried, counted and costed
        like the others; the one choice comes back as the server sent it (`Completion.choice`). For requests whose
        answer `Completion` does not model, such as teacher-forced scoring (`distill.teachers.served_cache`)."""
        return (await self._post("/completions", {"model": self.model, **body}, 1, _raw_choice))[0]

    async def aclose(self) -> None:
        """Close the connections; the client stays usable (the next request opens new ones)."""
        pools, self._pools = self._pools, []
        for pool in pools:
            await pool.aclose()

    async def __aenter__(self) -> TeacherClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # ------------------------------------------------------------------------------------------------------------
    # One request with retries
    # ------------------------------------------------------------------------------------------------------------

    def _bind(self) -> asyncio.Semaphore:
        """Connection pools and the semaphore of the running event loop (made anew when the loop changed).

        The connections are split over pools of at most POOL_SIZE: httpcore's pool does work proportional to its
        connections times its waiting requests for every request, which with one pool of 32 connections made the
        client, not the server, the bottleneck (benchmarks/generate_throughput.py)."""
        loop = asyncio.get_running_loop()
        if not self._pools or self._semaphore is None or self._loop is not loop:
            headers = {"Content-Type": "application/json", **self.headers}
            if self.api_key:
                headers["Authorization"] = f"Bearer {self.api_key}"
            sizes = [min(POOL_SIZE, self.concurrency - first) for first in range(0, self.concurrency, POOL_SIZE)]
            # One TLS context for all pools (each would load the CA bundle again, ~30 ms); none for plain http.
            context: ssl.SSLContext | bool = httpx.create_ssl_context() if self.base_url.startswith("https") else False
            self._pools = [
                httpx.AsyncClient(
                    verify=context,
                    base_url=self.base_url.rstrip("/"),
                    headers=headers,
                    limits=httpx.Limits(max_connections=size, max_keepalive_connections=size),
                    timeout=httpx.Timeout(self.timeout, connect=self.connect_timeout),
                    transport=self.transport,
                )
                for size in sizes
            ]
            self._free = sizes  # connections not in use, per pool
            self._semaphore = asyncio.Semaphore(self.concurrency)
            self._loop = loop
        return self._semaphore

    async def _post(self, path: str, body: dict[str, Any], n: int, parse: _Parse) -> list[Completion]:
        semaphore = self._bind()
        url = f"{self.base_url.rstrip('/')}{path}"
        malformed = 0
        last = ""
        for attempt in range(self.max_retries + 1):
            if attempt:
                self.usage.retries += 1
            async with semaphore:
                index = max(range(len(self._pools)), key=self._free.__getitem__)  # a pool with a free connection
                self._free[index] -= 1
                try:
                    retry = await self._attempt(self._pools[index], path, body, url, n, parse)
                finally:
                    self._free[index] += 1
            if not isinstance(retry, _Retry):
                return retry
            last = retry.reason
            if retry.malformed:
                malformed += 1
                if malformed > self.max_malformed:
                    break
            if attempt < self.max_retries:
                await asyncio.sleep(self._wait(attempt, retry.wait))
        self.usage.failures += 1
        raise TeacherClientError(f"{url} failed after {attempt + 1} attempts; last error: {last}")

    async def _attempt(
        self, client: httpx.AsyncClient, path: str, body: dict[str, Any], url: str, n: int, parse: _Parse
    ) -> list[Completion] | _Retry:
        """The completions of a successful response, or a `_Retry` saying why and how long the server wants."""
        try:
            response = await client.post(path, content=json.dumps(body))
        except httpx.TimeoutException as error:
            return _Retry(f"timed out ({type(error).__name__}) after {self.timeout:g} s")
        except httpx.TransportError as error:
            return _Retry(f"connection error ({type(error).__name__}: {error})")
        if response.status_code == 200:
            try:
                data = response.json()
            except ValueError as error:
                return _Retry(f"malformed response body (not JSON: {error}): {response.text[:200]!r}", malformed=True)
            self._count_tokens(data)
            try:
                completions = self._completions(data, n, parse)
            except (KeyError, TypeError, ValueError, AttributeError) as error:
                reason = f"malformed response body (missing or wrong {error!r}): {response.text[:200]!r}"
                return _Retry(reason, malformed=True)
            self.usage.requests += 1
            return completions
        message = _error_message(response)
        if response.status_code in RETRY_STATUSES or response.status_code >= 500:
            return _Retry(f"HTTP {response.status_code}: {message}", _retry_after(response.headers))
        hint = " (check the API key)" if response.status_code in (401, 403) else ""
        raise TeacherClientError(
            f"{url} refused the request with HTTP {response.status_code}{hint}: {message}",
            status=response.status_code,
            retryable=False,
        )

    def _wait(self, attempt: int, server_wait: float | None) -> float:
        if server_wait is not None:
            return min(max(server_wait, 0.0), self.max_retry_after)
        ceiling = min(self.max_backoff, self.backoff * 2**attempt)
        return ceiling / 2 + self._random.uniform(0, ceiling / 2)

    def _count_tokens(self, data: Any) -> None:
        """Add a 200 response's tokens and cost to the totals (also of a malformed one: the server billed it)."""
        usage = data.get("usage") if isinstance(data, dict) else None
        if not isinstance(usage, Mapping):
            self.usage.missing_usage += 1
            return
        prompt, completion = int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0)
        self.usage.prompt_tokens += prompt
        self.usage.completion_tokens += completion
        self.usage.cost += self.prices.cost(prompt, completion)

    def _completions(self, data: Any, n: int, parse: _Parse) -> list[Completion]:
        """Parse a 200 body; KeyError, TypeError or ValueError when it lacks what the API promises."""
        if not isinstance(data, dict) or not isinstance(data.get("choices"), list) or not data["choices"]:
            raise ValueError("no choices")
        choices = sorted(data["choices"], key=lambda c: int(c.get("index", 0)))
        completions = [parse(choice) for choice in choices]
        if len(completions) != n:
            raise TeacherClientError(
                f"asked the teacher API for n={n} choices and got {len(completions)}; this server does not support "
                "n > 1, so request one sample per call",
                retryable=False,
            )
        usage: Mapping[str, Any] = data["usage"] if isinstance(data.get("usage"), Mapping) else {}
        prompt, total = int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0)
        shares = [total // n + (1 if i < total % n else 0) for i in range(n)]
        for completion, share in zip(completions, shares):
            own = len(completion.logprobs.tokens) if completion.logprobs is not None and n > 1 else share
            completion.prompt_tokens = prompt
            completion.completion_tokens = own
            completion.cost = self.prices.cost(0, own) + self.prices.cost(prompt, 0) / n
        return completions


# ----------------------------------------------------------------------------------------------------------------
# Request bodies and response parsing
# ----------------------------------------------------------------------------------------------------------------


def _sampling(
    n: int, temperature: float, top_p: float, max_tokens: int | None, stop: Sequence[str] | None, seed: int | None
) -> dict[str, Any]:
    if n < 1:
        raise DistillError(f"n must be at least 1, got {n}")
    body: dict[str, Any] = {"n": n, "temperature": temperature, "top_p": top_p}
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    if stop:
        body["stop"] = list(stop)
    if seed is not None:
        body["seed"] = seed
    return body


def _chat_choice(choice: Mapping[str, Any]) -> Completion:
    message = choice["message"]
    text = message.get("content")
    if text is None:
        text = ""
    if not isinstance(text, str):
        raise ValueError("message content is not a string")
    reasoning = message.get("reasoning_content") or message.get("reasoning")
    logprobs = None
    content = (choice.get("logprobs") or {}).get("content")
    if content is not None:
        tokens = [str(item["token"]) for item in content]
        values = [float(item["logprob"]) for item in content]
        top = None
        if any(item.get("top_logprobs") for item in content):
            top = [[(str(t["token"]), float(t["logprob"])) for t in item.get("top_logprobs") or []] for item in content]
        logprobs = TokenLogprobs(tokens, values, top)
    return Completion(text, choice.get("finish_reason"), logprobs, reasoning if isinstance(reasoning, str) else None)


def _text_choice(choice: Mapping[str, Any]) -> Completion:
    text = choice["text"]
    if not isinstance(text, str):
        raise ValueError("text is not a string")
    logprobs = None
    raw = choice.get("logprobs")
    if raw and raw.get("tokens") is not None:
        top = None
        if raw.get("top_logprobs"):
            top = [[(str(t), float(lp)) for t, lp in (position or {}).items()] for position in raw["top_logprobs"]]
        values = [float(x) if x is not None else 0.0 for x in raw["token_logprobs"]]
        logprobs = TokenLogprobs([str(t) for t in raw["tokens"]], values, top)
    return Completion(text, choice.get("finish_reason"), logprobs)


def _raw_choice(choice: Mapping[str, Any]) -> Completion:
    if not isinstance(choice, Mapping):
        raise TypeError("a choice is not an object")
    text = choice.get("text")
    return Completion(text if isinstance(text, str) else "", choice.get("finish_reason"), choice=choice)


def _error_message(response: httpx.Response) -> str:
    """The server's own explanation ({"error": {"message": ...}} in the OpenAI format), else the body's start."""
    try:
        data = response.json()
        error = data.get("error") if isinstance(data, dict) else None
        if isinstance(error, Mapping) and error.get("message"):
            return str(error["message"])
        if isinstance(error, str):
            return error
        if isinstance(data, dict) and data.get("detail"):
            return str(data["detail"])
    except ValueError:
        pass
    return response.text[:200] or response.reason_phrase


def _retry_after(headers: httpx.Headers) -> float | None:
    """Seconds the server asks to wait: `retry-after-ms`, `Retry-After` as seconds or as an HTTP date."""
    milliseconds = headers.get("retry-after-ms")
    if milliseconds:
        try:
            return float(milliseconds) / 1000
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return float(value)
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(when.timestamp() - time.time(), 0.0)


async def run_workers(workers: Sequence[Coroutine[Any, Any, None]]) -> None:
    """Run `workers` together until all are done; the first error cancels the others (and is raised)."""
    tasks = [asyncio.ensure_future(worker) for worker in workers]
    try:
        await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def run_async(make: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """The coroutine `make()` in an event loop of its own, on uvloop (uvicorn[standard], extra `service`) when
    installed: less client CPU per request."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(make())
    return uvloop.run(make())
