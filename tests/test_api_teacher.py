"""TeacherClient against a real OpenAI-compatible server on loopback that injects faults (tests/_fake_openai.py)."""

from __future__ import annotations

import asyncio
import email.utils
import socket
import time

import httpx
import pytest

from _fake_openai import fake_openai
from distill.errors import DistillError
from distill.generate.client import Prices, TeacherClient, TeacherClientError, _retry_after

USER = [{"role": "user", "content": "what is 2 + 3 ?"}]


@pytest.fixture(scope="module")
def server():
    with fake_openai() as running:
        yield running


def run(coroutine):
    return asyncio.run(coroutine)


async def chat(teacher: TeacherClient, **options):
    try:
        return await teacher.chat(USER, **options)
    finally:
        await teacher.aclose()


def test_chat_and_complete_return_text_logprobs_usage_and_cost(server):
    server.configure()
    teacher = TeacherClient(server.url, "fake", api_key="sk-test", prices=Prices(2.0, 10.0))
    first = run(chat(teacher, n=2, top_logprobs=3, seed=7, max_tokens=50))
    assert len(first) == 2 and first[0].text != first[1].text
    assert first[0].text.endswith("#### 5") and first[0].finish_reason == "stop"
    assert first[0].logprobs is not None and len(first[0].logprobs.top[0]) == 3
    assert len(first[0].logprobs.tokens) == first[0].completion_tokens
    plain = run(chat(teacher, max_tokens=3))[0]
    assert plain.logprobs is None and plain.finish_reason == "length" and plain.completion_tokens == 3

    async def text():
        async with teacher:
            return await teacher.complete("once upon a time", top_logprobs=2)

    raw = run(text())[0]
    assert raw.logprobs is not None and [t for t, _ in raw.logprobs.top[0]][0] == raw.logprobs.tokens[0]

    bodies = server.stats()["bodies"]
    assert bodies[0]["n"] == 2 and bodies[0]["logprobs"] is True and bodies[0]["top_logprobs"] == 3
    assert bodies[2]["prompt"] == "once upon a time" and bodies[2]["logprobs"] == 2
    usage = teacher.usage
    assert usage.requests == 3 and usage.retries == 0 and usage.missing_usage == 0
    completions = [*first, plain, raw]
    assert usage.completion_tokens == sum(c.completion_tokens for c in completions)
    assert usage.prompt_tokens == 6 + 6 + 4  # whitespace words of the prompts, counted once per request
    assert usage.cost == pytest.approx((usage.prompt_tokens * 2.0 + usage.completion_tokens * 10.0) / 1e6)
    assert sum(c.cost for c in completions) == pytest.approx(usage.cost)


def test_429_waits_as_long_as_retry_after_says(server):
    server.configure(faults=["429", "429"], retry_after="0.4")
    teacher = TeacherClient(server.url, "fake", backoff=5.0)  # without Retry-After the waits would be >= 2.5 s + 5 s
    start = time.monotonic()
    assert run(chat(teacher))[0].text.endswith("#### 5")
    elapsed = time.monotonic() - start
    assert 0.8 <= elapsed < 2.0
    assert teacher.usage.retries == 2 and server.stats()["requests"] == 3


def test_retry_after_forms():
    assert _retry_after(httpx.Headers({"retry-after": "3"})) == 3.0
    assert _retry_after(httpx.Headers({"retry-after-ms": "250", "retry-after": "9"})) == 0.25
    later = email.utils.formatdate(time.time() + 30, usegmt=True)
    assert 25 < _retry_after(httpx.Headers({"retry-after": later})) <= 30
    past = email.utils.formatdate(time.time() - 30, usegmt=True)
    assert _retry_after(httpx.Headers({"retry-after": past})) == 0.0
    assert _retry_after(httpx.Headers({"retry-after": "soon"})) is None
    assert _retry_after(httpx.Headers({})) is None


def test_server_errors_then_success(server):
    server.configure(faults=["500", "503", "502"])
    teacher = TeacherClient(server.url, "fake", backoff=0.01)
    assert run(chat(teacher))[0].text.endswith("#### 5")
    assert teacher.usage.retries == 3 and teacher.usage.requests == 1 and server.stats()["requests"] == 4


def test_timeout_then_success(server):
    server.configure(faults=["hang"], hang=5.0)
    teacher = TeacherClient(server.url, "fake", timeout=0.5, backoff=0.01)
    start = time.monotonic()
    assert run(chat(teacher))[0].text.endswith("#### 5")
    assert time.monotonic() - start < 4.0
    assert teacher.usage.retries == 1


def test_malformed_bodies_are_retried_a_limited_number_of_times(server):
    server.configure(faults=["malformed", "missing"])
    teacher = TeacherClient(server.url, "fake", backoff=0.01, max_malformed=2)
    assert run(chat(teacher))[0].text.endswith("#### 5")
    assert teacher.usage.retries == 2

    server.configure(faults=["malformed", "missing", "malformed", "ok"])
    teacher = TeacherClient(server.url, "fake", backoff=0.01, max_malformed=2, max_retries=10)
    with pytest.raises(TeacherClientError, match="after 3 attempts.*malformed response body"):
        run(chat(teacher))
    assert server.stats()["requests"] == 3


def test_gives_up_after_max_retries_with_a_clear_error(server):
    server.configure(faults=["500"] * 10)
    teacher = TeacherClient(server.url, "fake", max_retries=3, backoff=0.01)
    with pytest.raises(TeacherClientError, match=r"chat/completions failed after 4 attempts; last error: HTTP 500"):
        run(chat(teacher))
    assert server.stats()["requests"] == 4
    assert teacher.usage.failures == 1 and teacher.usage.retries == 3 and teacher.usage.requests == 0


def test_client_errors_are_not_retried(server):
    server.configure(faults=["401"])
    teacher = TeacherClient(server.url, "fake", backoff=0.01)
    with pytest.raises(TeacherClientError, match="HTTP 401 \\(check the API key\\): fake error 401") as caught:
        run(chat(teacher))
    assert not caught.value.retryable and caught.value.status == 401
    assert server.stats()["requests"] == 1


def test_connection_errors_are_retried_then_reported():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # closed again below: nothing listens there
    teacher = TeacherClient(f"http://127.0.0.1:{port}/v1", "fake", max_retries=2, backoff=0.01)
    with pytest.raises(TeacherClientError, match="after 3 attempts; last error: connection error"):
        run(chat(teacher))


def test_a_server_without_n_is_a_clear_error(server):
    server.configure(n_supported=False)
    with pytest.raises(TeacherClientError, match="n=2 choices and got 1"):
        run(chat(TeacherClient(server.url, "fake"), n=2))


def test_concurrency_limit_is_respected(server):
    server.configure(delay=0.1)
    teacher = TeacherClient(server.url, "fake", concurrency=6)  # two connection pools: 4 + 2

    async def many():
        try:
            return await asyncio.gather(*(teacher.chat(USER) for _ in range(24)))
        finally:
            await teacher.aclose()

    start = time.monotonic()
    assert len(run(many())) == 24
    elapsed = time.monotonic() - start
    stats = server.stats()
    assert stats["max_arrived"] == 6  # at the server at once, queued or not
    assert elapsed >= 0.4  # 24 requests of 0.1 s, six at a time


def test_a_client_outlives_its_event_loop(server):
    server.configure()
    teacher = TeacherClient(server.url, "fake")
    run(teacher.chat(USER))  # the loop ends without aclose: the next loop gets fresh connections
    assert run(chat(teacher))[0].text.endswith("#### 5")


def test_bad_settings_are_refused():
    with pytest.raises(DistillError, match="http:// or https://"):
        TeacherClient("localhost:8000/v1", "m")
    with pytest.raises(DistillError, match="concurrency"):
        TeacherClient("http://localhost:8000/v1", "m", concurrency=0)
