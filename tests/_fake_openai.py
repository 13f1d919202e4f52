"""A fault-injecting OpenAI-compatible server for tests and benchmarks, served by uvicorn in a child process.

    with fake_openai(delay=0.05, max_concurrency=16) as server:
        teacher = TeacherClient(server.url, "fake")
        server.configure(faults=["429", "500"])   # the next two completion requests fail, then all succeed
        ...
        server.stats()["requests"]

Answers are deterministic: a function of the prompt, the seed and the choice index. A prompt containing `A + B`
(integers) is answered with their sum after `####` (GSM8K style); any other with a number derived from its hash.
Settings (all changeable with `configure`, which also resets the counters):

    delay            seconds each request takes (served under the concurrency cap)
    max_concurrency  requests served at once; more wait (`over_capacity="queue"`) or get 429 ("reject")
    retry_after      the Retry-After header of 429 answers ("0" by default; seconds or an HTTP date)
    faults           a script for the next completion requests, one entry each: "ok", "429" (with Retry-After), any
                     other HTTP status ("500", "400", ...), "hang" (sleeps `hang` seconds, past the client's
                     timeout, then answers), "malformed" (200 with broken JSON), "missing" (200 JSON, no choices)
    fault_rate       after the script, the share of requests that fail with a kind drawn from `fault_kinds`
    logprobs         whether to return log-probs when asked
    n_supported      False answers one choice whatever `n` asks (like servers without n > 1)
    replies          [[substring, reply], ...]: a prompt (or conversation) containing a substring is answered with
                     its reply instead, the first that matches (a fake judge: tests/test_judge.py)

Run as a script it serves on the listening socket whose file descriptor it is given (`--fd`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import random
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

DEFAULTS: dict[str, Any] = {
    "delay": 0.0,
    "max_concurrency": 1000,
    "over_capacity": "queue",
    "retry_after": "0",
    "faults": [],
    "fault_rate": 0.0,
    "fault_kinds": ["429", "500", "malformed"],
    "fault_seed": 0,
    "hang": 5.0,
    "logprobs": True,
    "n_supported": True,
    "replies": [],
}

# ----------------------------------------------------------------------------------------------------------------
# Answers
# ----------------------------------------------------------------------------------------------------------------


def answer(prompt: str, seed: int | None, index: int) -> str:
    """The deterministic reply to a prompt for one choice."""
    match = re.search(r"(-?\d+)\s*\+\s*(-?\d+)", prompt)
    digest = hashlib.sha256(f"{prompt}|{seed}|{index}".encode()).hexdigest()
    if match:
        result = int(match.group(1)) + int(match.group(2))
        return f"({digest[:6]}) We add {match.group(1)} and {match.group(2)} to get {result}. #### {result}"
    return f"Thinking about it ({digest[:6]}) the answer is {int(digest[6:12], 16) % 1000}. #### {int(digest[6:12], 16) % 1000}"


def _logprob(token: str, position: int) -> float:
    return -(int(hashlib.sha256(f"{token}|{position}".encode()).hexdigest()[:4], 16) % 400) / 100 - 0.01


def _choice_tokens(text: str, max_tokens: int | None, stop: list[str]) -> tuple[list[str], str]:
    finish = "stop"
    for s in stop:
        if s and s in text:
            text = text[: text.index(s)]
    tokens = [t + " " for t in text.split(" ")] if text else []
    if tokens:
        tokens[-1] = tokens[-1][:-1]
    if max_tokens is not None and len(tokens) > max_tokens:
        tokens, finish = tokens[:max_tokens], "length"
    return tokens, finish


def completion_body(body: dict[str, Any], chat: bool, settings: dict[str, Any]) -> dict[str, Any]:
    """An OpenAI-format response to a chat or text completion request."""
    if chat:
        prompt = "\n".join(str(m.get("content", "")) for m in body["messages"])
    else:
        prompt = str(body["prompt"])
    n = int(body.get("n", 1)) if settings["n_supported"] else 1
    stop = body.get("stop") or []
    stop = [stop] if isinstance(stop, str) else list(stop)
    want_logprobs = bool(body.get("logprobs")) if chat else body.get("logprobs") is not None
    top_k = int(body.get("top_logprobs") or 0) if chat else int(body.get("logprobs") or 0)
    choices, total = [], 0
    reply = next((text for key, text in settings["replies"] if key in prompt), None)
    for index in range(n):
        text = reply if reply is not None else answer(prompt, body.get("seed"), index)
        tokens, finish = _choice_tokens(text, body.get("max_tokens"), stop)
        total += len(tokens)
        text = "".join(tokens)
        choice: dict[str, Any] = {"index": index, "finish_reason": finish, "logprobs": None}
        values = [_logprob(t, i) for i, t in enumerate(tokens)]
        alternatives = [[(f"alt{j}", v - 1 - j) for j in range(top_k)] for v in values]
        if chat:
            choice["message"] = {"role": "assistant", "content": text}
            if want_logprobs and settings["logprobs"]:
                content = [
                    {
                        "token": t,
                        "logprob": v,
                        "bytes": list(t.encode()),
                        "top_logprobs": [
                            {"token": t, "logprob": v},
                            *({"token": a, "logprob": lp} for a, lp in alt[1:]),
                        ][:top_k],
                    }
                    for t, v, alt in zip(tokens, values, alternatives)
                ]
                choice["logprobs"] = {"content": content}
        else:
            choice["text"] = text
            if want_logprobs and settings["logprobs"]:
                choice["logprobs"] = {
                    "tokens": tokens,
                    "token_logprobs": values,
                    "top_logprobs": [
                        dict([(t, v), *alt[1:]][:top_k]) for t, v, alt in zip(tokens, values, alternatives)
                    ]
                    if top_k
                    else None,
                    "text_offset": [sum(len(x) for x in tokens[:i]) for i in range(len(tokens))],
                }
        choices.append(choice)
    prompt_tokens = len(prompt.split())
    return {
        "id": "cmpl-" + hashlib.sha256(prompt.encode()).hexdigest()[:12],
        "object": "chat.completion" if chat else "text_completion",
        "created": int(time.time()),
        "model": body.get("model", "fake"),
        "choices": choices,
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": total, "total_tokens": prompt_tokens + total},
    }


# ----------------------------------------------------------------------------------------------------------------
# The app (child process)
# ----------------------------------------------------------------------------------------------------------------


def make_app(initial: dict[str, Any]) -> FastAPI:
    app = FastAPI()
    state: dict[str, Any] = {}

    def reset(settings: dict[str, Any]) -> None:
        unknown = set(settings) - set(DEFAULTS)
        if unknown:
            raise ValueError(f"unknown fake server settings {sorted(unknown)}")
        state["settings"] = {**DEFAULTS, **settings}
        state["script"] = list(state["settings"]["faults"])
        state["random"] = random.Random(state["settings"]["fault_seed"])
        state["gate"] = asyncio.Semaphore(state["settings"]["max_concurrency"])
        state["stats"] = {
            "requests": 0,
            "served": 0,
            "faults": {},
            "in_flight": 0,
            "max_in_flight": 0,
            "arrived": 0,
            "max_arrived": 0,
            "slot_seconds": 0.0,
            "bodies": [],
        }

    reset(initial)

    @app.post("/control/config")
    async def configure(request: Request) -> Any:
        try:
            reset(await request.json())
        except ValueError as error:
            return JSONResponse({"error": str(error)}, status_code=400)
        return {"ok": True}

    @app.get("/control/stats")
    async def stats() -> Any:
        return state["stats"]

    async def handle(request: Request, chat: bool) -> Any:
        settings, stats = state["settings"], state["stats"]
        stats["requests"] += 1
        stats["arrived"] += 1
        stats["max_arrived"] = max(stats["max_arrived"], stats["arrived"])
        try:
            body = await request.json()
            stats["bodies"].append(body)
            fault = state["script"].pop(0) if state["script"] else "ok"
            if fault == "ok" and settings["fault_rate"] and state["random"].random() < settings["fault_rate"]:
                fault = state["random"].choice(settings["fault_kinds"])
            if fault != "ok":
                stats["faults"][fault] = stats["faults"].get(fault, 0) + 1
            if fault == "429":
                return _error(429, "rate limited", {"Retry-After": settings["retry_after"]})
            if fault.isdigit():
                return _error(int(fault), f"fake error {fault}")
            if settings["over_capacity"] == "reject" and stats["in_flight"] >= settings["max_concurrency"]:
                stats["faults"]["over_capacity"] = stats["faults"].get("over_capacity", 0) + 1
                return _error(429, "too many requests", {"Retry-After": settings["retry_after"]})
            async with state["gate"]:
                stats["in_flight"] += 1
                stats["max_in_flight"] = max(stats["max_in_flight"], stats["in_flight"])
                start = time.perf_counter()
                try:
                    await asyncio.sleep(settings["hang"] if fault == "hang" else settings["delay"])
                finally:
                    stats["in_flight"] -= 1
                    stats["slot_seconds"] += time.perf_counter() - start
            if fault == "malformed":
                return Response(b'{"id": "x", "choices": [{"index": 0, "mess', media_type="application/json")
            if fault == "missing":
                return JSONResponse({"id": "x", "object": "chat.completion", "usage": {"prompt_tokens": 1}})
            stats["served"] += 1
            return JSONResponse(completion_body(body, chat, settings))
        finally:
            stats["arrived"] -= 1

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Any:
        return await handle(request, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        return await handle(request, chat=False)

    return app


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(
        {"error": {"message": message, "type": "fake", "code": status}}, status_code=status, headers=headers
    )


def main() -> None:
    import uvicorn

    parser = argparse.ArgumentParser()
    parser.add_argument("--fd", type=int, required=True)
    parser.add_argument("--settings", default="{}")
    args = parser.parse_args()
    sock = socket.socket(fileno=args.fd)
    config = uvicorn.Config(make_app(json.loads(args.settings)), log_level="error", access_log=False, lifespan="off")
    server = uvicorn.Server(config).serve(sockets=[sock])
    try:  # uvloop (uvicorn[standard]) as production servers run; its timers fire closer to the fixed delay
        import uvloop
    except ImportError:
        asyncio.run(server)
    else:
        uvloop.run(server)


# ----------------------------------------------------------------------------------------------------------------
# The handle (parent process)
# ----------------------------------------------------------------------------------------------------------------


class FakeOpenAI:
    """A running fake server: `url` ends in /v1, ready for `TeacherClient(base_url=url, ...)`."""

    def __init__(self, process: subprocess.Popen[bytes], port: int):
        self.process = process
        self.port = port
        self.url = f"http://127.0.0.1:{port}/v1"

    def configure(self, **settings: Any) -> None:
        """Replace the settings (unnamed ones return to their defaults) and reset the counters."""
        import httpx

        response = httpx.post(f"http://127.0.0.1:{self.port}/control/config", json=settings, timeout=10)
        response.raise_for_status()

    def stats(self) -> dict[str, Any]:
        """requests (completion requests seen), served, faults {kind: count}, max_in_flight (served at once),
        max_arrived (requests at the server at once, queued ones included), slot_seconds (time spent in the
        per-request delay, summed; more than requests x delay when the server's timers fire late), bodies (the
        request bodies)."""
        import httpx

        return httpx.get(f"http://127.0.0.1:{self.port}/control/stats", timeout=10).json()


@contextlib.contextmanager
def fake_openai(**settings: Any) -> Iterator[FakeOpenAI]:
    """Start the server in a child process on a free loopback port; stop it on exit."""
    import httpx

    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    listener.listen(1024)
    port = listener.getsockname()[1]
    command = [sys.executable, __file__, "--fd", str(listener.fileno()), "--settings", json.dumps(settings)]
    process = subprocess.Popen(command, pass_fds=[listener.fileno()])
    listener.close()
    server = FakeOpenAI(process, port)
    try:
        deadline = time.monotonic() + 30
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"the fake OpenAI server exited with code {process.returncode}")
            try:
                httpx.get(f"http://127.0.0.1:{port}/control/stats", timeout=1)
                break
            except httpx.TransportError:
                if time.monotonic() > deadline:
                    raise RuntimeError("the fake OpenAI server did not start within 30 s") from None
                time.sleep(0.05)
        yield server
    finally:
        process.kill()  # no graceful shutdown: it would wait for "hang" requests to finish
        process.wait()


if __name__ == "__main__":
    main()
