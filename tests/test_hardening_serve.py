"""Hardening of `distill serve` and the service's inference routes (issue 12): every request held to limits with
an OpenAI-shaped 400 (413 for the body), templating and tokenizing off the event loop, a generation cancelled when
its client leaves, finite sampling numbers, and one line `error: ...` with exit status 2 for a bad CLI option."""

from __future__ import annotations

import asyncio
import contextlib
import json
import select
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest
import torch

from _rss import MB, PeakRss
from _service import cli_env, free_port
from distill.asgi import ServeLimits
from distill.batcher import Batcher
from distill.engine import Engine, SamplingParams, Sequence
from distill.hf import load_causal_lm, load_tokenizer
from distill.serve import app as serve_module
from distill.serve import create_app, serve_in_thread
from test_cli import assert_one_line_error, distill_cli
from test_serve import tiny_chat_lm

LIMITS = ServeLimits(max_body_bytes=64 * 1024, max_prompts=4, max_n=3, max_tokens=20, max_sequences=6)
MESSAGES = [{"role": "user", "content": "i love this film"}]
STEP_SECONDS = 0.05  # each forward step of a slowed model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("hardening") / "tiny"
    tiny_chat_lm(directory)  # context 64, so a prompt is tokenized only up to 64 x 64 characters
    return directory


@pytest.fixture(scope="module")
def client(model_dir):
    from fastapi.testclient import TestClient

    with TestClient(create_app(model_dir, model_name="tiny", batch_wait_ms=1, limits=LIMITS)) as test_client:
        yield test_client


def refused(response, status: int, code: str, param: str | None = None) -> dict:
    """The OpenAI error body of `response`, checked."""
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["code"] == code and error["type"] == "invalid_request_error", error
    if param is not None:
        assert error["param"] == param, error
    return error


def test_limits_are_openai_400s_checked_before_tokenizing(client, monkeypatch):
    encoded = []
    encode = Engine.encode
    monkeypatch.setattr(Engine, "encode", lambda self, text, **kw: encoded.append(text) or encode(self, text, **kw))
    cases = [
        ("/v1/completions", {"prompt": ["a"] * 5}, "too_many_prompts", "prompt"),
        ("/v1/completions", {"prompt": "a", "n": 4}, "n_too_large", "n"),
        ("/v1/completions", {"prompt": ["a", "b", "c"], "n": 3}, "too_many_sequences", "n"),
        ("/v1/completions", {"prompt": "a", "max_tokens": 21}, "max_tokens_too_large", "max_tokens"),
        ("/v1/chat/completions", {"messages": MESSAGES, "n": 4}, "n_too_large", "n"),
        ("/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 21}, "max_tokens_too_large", "max_tokens"),
        (
            "/v1/chat/completions",
            {"messages": MESSAGES, "max_completion_tokens": 10**12},
            "max_tokens_too_large",
            "max_completion_tokens",
        ),
    ]
    for path, fields, code, param in cases:
        refused(client.post(path, json={"model": "tiny", **fields}), 400, code, param)
    assert encoded == []  # no prompt of a refused request was tokenized
    at_limits = {"model": "tiny", "prompt": ["a", "the dog"], "n": 3, "max_tokens": 20, "temperature": 0}
    response = client.post("/v1/completions", json=at_limits)
    assert response.status_code == 200 and len(response.json()["choices"]) == 6
    assert encoded == ["a", "the dog"]


def test_chat_default_max_tokens_is_capped_by_the_limit(client, model_dir):
    from fastapi.testclient import TestClient

    body = {"model": "tiny", "messages": MESSAGES, "temperature": 0}
    capped = client.post("/v1/chat/completions", json=body).json()
    assert capped["usage"]["completion_tokens"] == LIMITS.max_tokens
    assert capped["choices"][0]["finish_reason"] == "length"
    with TestClient(create_app(model_dir, model_name="tiny", batch_wait_ms=1)) as roomy:
        whole = roomy.post("/v1/chat/completions", json=body).json()
    assert whole["usage"]["completion_tokens"] > LIMITS.max_tokens  # the rest of the context, by default
    assert whole["choices"][0]["message"]["content"].startswith(capped["choices"][0]["message"]["content"])


@pytest.mark.parametrize(
    "raw, param",
    [
        ('{"model": "tiny", "prompt": "a", "temperature": Infinity}', "temperature"),
        ('{"model": "tiny", "prompt": "a", "temperature": 1e999}', "temperature"),
        ('{"model": "tiny", "prompt": "a", "top_p": NaN}', "top_p"),
        ('{"model": "tiny", "prompt": "a", "top_p": -Infinity}', "top_p"),
        ('{"model": "tiny", "prompt": "a", "frequency_penalty": 2.5}', "frequency_penalty"),
        ('{"model": "tiny", "prompt": "a", "n": 0}', "n"),
        ('{"model": "tiny"}', "prompt"),
    ],
)
def test_malformed_requests_are_openai_422s(client, raw, param):
    response = client.post("/v1/completions", content=raw, headers={"content-type": "application/json"})
    refused(response, 422, "invalid_value", param)


def test_bodies_too_large_or_too_deep_never_reach_the_app(client):
    big = {"model": "tiny", "prompt": "a" * LIMITS.max_body_bytes}
    refused(client.post("/v1/completions", json=big), 413, "too_large")
    nested = {"model": "tiny", "messages": [{"role": "user", "content": [[[]]]}]}
    deep = json.dumps(nested).replace("[[[]]]", "[" * 500 + "]" * 500)
    response = client.post("/v1/chat/completions", content=deep, headers={"content-type": "application/json"})
    refused(response, 400, "json_too_deep")
    assert client.get("/v1/models").status_code == 200


def test_a_prompt_too_long_for_the_context_is_refused_before_tokenizing(client):
    too_long = client.post("/v1/completions", json={"model": "tiny", "prompt": "the " * 1250})
    error = refused(too_long, 400, "context_length_exceeded", "prompt")
    assert "5000 characters" in error["message"] and "64 tokens" in error["message"]
    chat = {"model": "tiny", "messages": [{"role": "user", "content": "the " * 1250}]}
    refused(client.post("/v1/chat/completions", json=chat), 400, "context_length_exceeded", "messages")
    fits = client.post("/v1/completions", json={"model": "tiny", "prompt": "the " * 50, "max_tokens": 20})
    error = refused(fits, 400, "context_length_exceeded", "max_tokens")
    assert "at most 14" in error["message"]


def test_templating_and_tokenizing_run_off_the_event_loop(model_dir, monkeypatch):
    """A slow tokenizer (and chat template) must not stall other requests: GET /v1/models answers meanwhile."""
    encode, template = Engine.encode, serve_module.chat_prompt

    def slow_encode(self, text, **kw):
        time.sleep(1.5)
        return encode(self, text, **kw)

    def slow_template(tokenizer, messages):
        time.sleep(1.5)
        return template(tokenizer, messages)

    monkeypatch.setattr(Engine, "encode", slow_encode)
    monkeypatch.setattr(serve_module, "chat_prompt", slow_template)
    app = create_app(model_dir, model_name="tiny", batch_wait_ms=1)

    async def meanwhile(path: str, body: dict) -> tuple[float, bool, int]:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as http:
            start = time.monotonic()
            slow = asyncio.create_task(http.post(path, json={"model": "tiny", "max_tokens": 2, **body}))
            await asyncio.sleep(0.3)  # the slow request is in its template or tokenizer by now
            assert (await http.get("/v1/models")).status_code == 200
            waited, pending = time.monotonic() - start, not slow.done()
            return waited, pending, (await slow).status_code

    for path, body in (
        ("/v1/completions", {"prompt": "the movie was"}),
        ("/v1/chat/completions", {"messages": MESSAGES}),
    ):
        waited, pending, status = asyncio.run(meanwhile(path, body))
        assert pending and status == 200, path
        assert waited < 0.8, f"{path}: GET /v1/models answered {waited:.2f} s after the slow request came"


def _engine(model_dir) -> Engine:
    engine = Engine(load_causal_lm(model_dir), load_tokenizer(model_dir))
    engine.eos_ids = set()  # no row ends early: each runs to its max_tokens
    return engine


def test_a_cancelled_row_ends_at_the_next_step_and_its_batch_goes_on(model_dir, monkeypatch):
    engine = _engine(model_dir)
    prompt = engine.encode("the movie was")
    alone = Sequence(list(prompt), SamplingParams(max_tokens=12, temperature=0))
    engine.generate([alone])
    keep = Sequence(list(prompt), SamplingParams(max_tokens=12, temperature=0))
    cut = Sequence(list(prompt), SamplingParams(max_tokens=12, temperature=0))
    forward, steps = engine._forward, []

    def counting(*args):
        steps.append(1)
        if len(steps) == 4:  # the prompt's step and those after tokens 1 and 2; token 3 comes of this one
            cut.cancelled = True
        return forward(*args)

    monkeypatch.setattr(engine, "_forward", counting)
    engine.generate([keep, cut])
    assert cut.finish_reason == "cancelled" and cut.generated == 3 and len(cut.token_ids) == 3
    assert keep.finish_reason == "length" and keep.generated == 12 and keep.text == alone.text

    steps.clear()
    only = Sequence(list(prompt), SamplingParams(max_tokens=12, temperature=0))
    cut = only
    engine.generate([only])
    assert only.finish_reason == "cancelled" and len(steps) == 4  # every row gone: no further step


def test_the_batcher_skips_a_job_cancelled_while_it_waits(model_dir, monkeypatch):
    engine = _engine(model_dir)
    batches: list[list[Sequence]] = []
    generate = engine.generate

    def recording(rows):
        batches.append(rows)
        time.sleep(0.3)
        generate(rows)

    monkeypatch.setattr(engine, "generate", recording)
    prompt = engine.encode("the dog")
    first, second = (Sequence(list(prompt), SamplingParams(max_tokens=3, temperature=0)) for _ in range(2))

    async def scenario() -> None:
        batcher = Batcher(engine, max_batch_size=1, wait_ms=0)
        running = asyncio.create_task(batcher.run([first]))
        await asyncio.sleep(0.1)  # the first batch is running; the second request waits for it
        waiting = asyncio.create_task(batcher.run([second]))
        await asyncio.sleep(0.05)
        waiting.cancel()
        await running
        with contextlib.suppress(asyncio.CancelledError):
            await waiting
        await asyncio.sleep(0.2)  # the worker has looked at the queue again
        await batcher.close()

    asyncio.run(scenario())
    assert batches == [[first]] and first.finish_reason == "length"
    assert second.cancelled and second.finish_reason == "cancelled" and second.generated == 0


def test_a_request_larger_than_a_batch_is_split_into_batches(model_dir, monkeypatch):
    """No batch outgrows max_batch_size, whatever n x prompts a request asks (its KV cache is bounded by it)."""
    from fastapi.testclient import TestClient

    sizes = []
    generate = Engine.generate
    monkeypatch.setattr(Engine, "generate", lambda self, rows: sizes.append(len(rows)) or generate(self, rows))
    body = {"model": "tiny", "prompt": ["the movie was", "a dog"], "n": 3, "max_tokens": 5, "temperature": 0}
    with TestClient(create_app(model_dir, model_name="tiny", max_batch_size=2, batch_wait_ms=1)) as small:
        choices = small.post("/v1/completions", json=body).json()["choices"]
        alone = [small.post("/v1/completions", json=body | {"prompt": p, "n": 1}).json() for p in body["prompt"]]
    assert sizes == [2, 2, 2, 1, 1]  # the six rows in three batches, then each prompt alone
    assert [c["text"] for c in choices] == [a["choices"][0]["text"] for a in alone for _ in range(3)]


@pytest.fixture
def slow_steps(monkeypatch):
    """Every forward step of a served model takes STEP_SECONDS and never picks end-of-sequence (generation runs to
    max_tokens); the list holds the time of each step."""
    times: list[float] = []
    forward = Engine._forward

    def slow(self, *args):
        time.sleep(STEP_SECONDS)
        times.append(time.monotonic())
        logits, cache = forward(self, *args)
        logits[:, sorted(self.eos_ids)] = float("-inf")
        return logits, cache

    monkeypatch.setattr(Engine, "_forward", slow)
    return times


def post_then_leave(base: str, path: str, body: dict, steps: list[float], *, after: int = 5) -> float:
    """POST `body` on a raw connection, wait until the server has run `after` steps (streaming: and sent the first
    bytes), then close the connection; returns when it was closed."""
    url = httpx.URL(base)
    data = json.dumps(body).encode()
    head = f"POST {path} HTTP/1.1\r\nHost: {url.host}:{url.port}\r\nContent-Type: application/json\r\n"
    connection = socket.create_connection((url.host, url.port), timeout=30)
    connection.sendall(f"{head}Content-Length: {len(data)}\r\n\r\n".encode() + data)
    deadline = time.monotonic() + 30
    while len(steps) < after:
        assert time.monotonic() < deadline, "the generation did not start"
        time.sleep(0.01)
    if body.get("stream"):
        assert connection.recv(4096).startswith(b"HTTP/1.1 200"), "the stream did not start"
    connection.close()
    return time.monotonic()


def assert_work_stops(steps: list[float], left: float, planned: int) -> float:
    """The steps stop within a second of the client leaving, long before the `planned` ones; returns the delay."""
    time.sleep(1.5)
    count = len(steps)
    time.sleep(0.5)
    assert len(steps) == count, "the server still generates for a client that left"
    delay = steps[-1] - left
    assert delay < 1.0, f"the last step came {delay:.2f} s after the client left"
    assert count < planned / 2, f"{count} of {planned} steps ran"
    return delay


@pytest.mark.parametrize(
    "path, fields",
    [
        ("/v1/completions", {"prompt": "the movie was", "n": 3}),
        ("/v1/chat/completions", {"messages": MESSAGES, "n": 2, "stream": True}),
    ],
)
def test_a_client_that_leaves_stops_its_generation(model_dir, slow_steps, path, fields):
    with serve_in_thread(model_dir, model_name="tiny", batch_wait_ms=1) as base:
        origin = base.removesuffix("/v1")
        body = {"model": "tiny", "max_tokens": 50, "temperature": 1.0, **fields}
        left = post_then_leave(origin, path, body, slow_steps)
        delay = assert_work_stops(slow_steps, left, planned=50)
        print(f"{path} stream={bool(fields.get('stream'))}: work stopped {delay * 1000:.0f} ms after the client left")
        again = httpx.post(f"{base}/completions", json={"model": "tiny", "prompt": "a", "max_tokens": 3}, timeout=30)
        assert again.status_code == 200 and again.json()["usage"]["completion_tokens"] == 3


def _hostile(port: int, head: str, chunks) -> int:
    """Send `head` and then the body `chunks` while watching for an early answer; the answer's status."""
    connection = socket.create_connection(("127.0.0.1", port), timeout=60)
    answer = b""
    try:
        connection.sendall(head.encode())
        for chunk in chunks:
            if select.select([connection], [], [], 0)[0]:
                break  # the server answered before the end of the body
            try:
                connection.sendall(chunk)
            except (BrokenPipeError, ConnectionResetError):
                break
        connection.settimeout(60)
        while b"\r\n" not in answer:
            piece = connection.recv(4096)
            if not piece:
                break
            answer += piece
    finally:
        connection.close()
    return int(answer.split()[1])


@pytest.fixture(scope="module")
def served(model_dir):
    """`distill serve` in a subprocess with the default limits."""
    port = free_port()
    command = [sys.executable, "-m", "distill.cli", "serve", "--model", str(model_dir), "--port", str(port)]
    process = subprocess.Popen(command, env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 90
        while True:
            assert process.poll() is None, "distill serve exited"
            try:
                httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=1)
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "distill serve did not start"
                time.sleep(0.2)
        yield process, port
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_hostile_bodies_are_refused_with_bounded_memory(served):
    process, port = served
    size = 16 * MB
    prefix = b'{"model": "tiny", "prompt": "'
    body = [prefix] + [b"the movie was " * 4681] * (size // 65534) + [b'"}']  # chunks of 64 KiB
    head = f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
    growths = {}
    peak = PeakRss(process.pid)
    length = sum(len(chunk) for chunk in body)
    assert _hostile(port, f"{head}Content-Length: {length}\r\n\r\n", body) == 413
    growths["16 MB, Content-Length"] = peak.growth()

    def chunked():
        for chunk in body:
            yield f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n"
        yield b"0\r\n\r\n"

    peak = PeakRss(process.pid)
    assert _hostile(port, f"{head}Transfer-Encoding: chunked\r\n\r\n", chunked()) == 413
    growths["16 MB, chunked"] = peak.growth()

    prompt = "the movie was " * ((4 * MB - 1024) // 14)  # just under the body limit: read, refused untokenized
    peak = PeakRss(process.pid)
    start = time.monotonic()
    response = httpx.post(
        f"http://127.0.0.1:{port}/v1/completions", json={"model": "tiny", "prompt": prompt}, timeout=60
    )
    seconds = time.monotonic() - start
    growths["4 MB prompt"] = peak.growth()
    refused(response, 400, "context_length_exceeded", "prompt")
    print({name: f"{value / MB:.1f} MB" for name, value in growths.items()}, f"4 MB prompt answered in {seconds:.2f} s")
    assert all(value < 64 * MB for value in growths.values()), growths
    assert seconds < 5
    assert httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=5).status_code == 200


def run_main(monkeypatch, capsys, *args) -> str:
    """`distill ARGS` run in this process through `distill.cli.main`: exit status 2 and one line `error: ...`."""
    from distill import cli

    monkeypatch.setattr(sys, "argv", ["distill", *map(str, args)])
    with pytest.raises(SystemExit) as exited:
        cli.main()
    assert exited.value.code == 2
    stderr = capsys.readouterr().err
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in stderr, stderr
    return lines[0]


SERVE_BAD = [
    (["--port", "99999"], "--port"),
    (["--port", "0"], "--port"),
    (["--batch-wait-ms", "nan"], "--batch-wait-ms"),
    (["--batch-wait-ms", "-1"], "--batch-wait-ms"),
    (["--max-batch-size", "0"], "--max-batch-size"),
    (["--max-n", "0"], "--max-n"),
    (["--max-body-mb", "0"], "--max-body-mb"),
    (["--device", "nonsense"], "not a device"),
    (["--name", " "], "--name"),
]
GENERATE_BAD = [
    (["--temperature", "inf"], "--temperature"),
    (["--temperature", "nan"], "--temperature"),
    (["--temperature", "2.5"], "--temperature"),
    (["--top-p", "0"], "--top-p"),
    (["--n", "0"], "--n"),
    (["--n", "1000"], "--n"),
    (["--top-logprobs", "21"], "--top-logprobs"),
    (["--timeout", "-1"], "--timeout"),
    (["--price-input", "inf"], "--price-input"),
    (["--concurrency", "0"], "--concurrency"),
    (["--seed", str(2**32)], "--seed"),  # distill.config's MAX_SEED, as the service's generate jobs
    (["--seed", "-1"], "--seed"),
    (["--max-retries", "21"], "--max-retries"),
]


@pytest.mark.parametrize("args, fragment", SERVE_BAD)
def test_serve_options_out_of_range_get_one_line(model_dir, monkeypatch, capsys, args, fragment):
    assert fragment in run_main(monkeypatch, capsys, "serve", "--model", model_dir, *args)


@pytest.mark.parametrize("args, fragment", GENERATE_BAD)
def test_generate_options_out_of_range_get_one_line(tmp_path, monkeypatch, capsys, args, fragment):
    prompts = tmp_path / "p.txt"
    prompts.write_text("what is 2 + 2?\n")
    line = run_main(monkeypatch, capsys, "generate", "-p", prompts, "-o", tmp_path / "o.jsonl", "--model", "m", *args)
    assert fragment in line
    assert not (tmp_path / "o.jsonl").exists()


def test_traces_options_out_of_range_get_one_line(tmp_path, monkeypatch, capsys):
    traces = tmp_path / "t.jsonl"
    traces.write_text("")
    line = run_main(monkeypatch, capsys, "traces", traces, "-o", tmp_path / "s", "--max-per-question", "0")
    assert "--max-per-question" in line


@pytest.mark.skipif(torch.cuda.device_count() > 7, reason="this machine has a cuda:7")
def test_serve_on_a_missing_device_or_port_is_one_line_as_a_user_runs_it(model_dir, tmp_path):
    assert_one_line_error(distill_cli("serve", "--model", model_dir, "--device", "cuda:7", cwd=tmp_path), "cuda:7")
    assert_one_line_error(distill_cli("serve", "--model", model_dir, "--port", "99999", cwd=tmp_path), "--port")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = distill_cli("serve", "--model", model_dir, "--port", port, cwd=tmp_path)
    assert_one_line_error(result, f"cannot listen on 127.0.0.1:{port}")


def test_create_app_refuses_bad_settings_before_loading(model_dir):
    from distill.errors import DistillError

    for kwargs, fragment in (
        ({"batch_wait_ms": float("nan")}, "batch_wait_ms"),
        ({"max_batch_size": 0}, "max_batch_size"),
        ({"device": "cuda:99"}, "cuda:99"),
        ({"device": "meta"}, "meta"),
    ):
        with pytest.raises(DistillError, match=fragment):
            create_app(model_dir, **kwargs)
    with pytest.raises(ValueError, match="max_n"):
        ServeLimits(max_n=0)
    with pytest.raises(ValueError, match="wait_ms"):
        Batcher(_engine(model_dir), wait_ms=float("nan"))


# The service: classifier routes held to Settings.serve_limits, LM students served with them, cancellation through
# the service's Forward.

SERVICE_LIMITS = ServeLimits(max_prompts=4, max_n=3, max_tokens=50, max_sequences=6)
SIGNAL = json.dumps([0.5] * 40)


def finished_classifier_job(settings) -> str:
    """A job that produced a tiny MNIST-1D-shaped MLP (40 inputs, 10 classes), recorded straight into the store."""
    from distill import models
    from distill.config import ModelSpec
    from distill.service import db, jobs
    from distill.service.refs import job_output

    engine = db.open_engine(settings.url, pool_size=1)
    db.ensure_schema(engine)
    job, _ = jobs.create(engine, "train", {}, name="tiny-mlp", created_by="local", idempotency_key=None)
    spec = ModelSpec(family="mlp", width=8, depth=1)
    torch.manual_seed(0)
    models.save(models.build(spec, (40,), 10), job_output(settings, job["id"]) / "model", spec, (40,), 10)
    with db.write(engine) as connection:
        connection.execute(
            db.jobs.update().where(db.jobs.c.id == job["id"]).values(status="succeeded", finished_at=time.time())
        )
    engine.dispose()
    return job["id"]


@contextlib.contextmanager
def running(app):
    """`app` served by uvicorn from a thread on a free loopback port; yields its origin."""
    import uvicorn

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [listener]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "the service did not start"
            time.sleep(0.01)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        listener.close()


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    pytest.importorskip("sqlalchemy")
    from _service import finished_lm_job
    from distill.service.app import create_app as service_app
    from distill.service.settings import Settings

    data = tmp_path_factory.mktemp("service") / "data"
    settings = Settings(data_dir=data, serve_limits=SERVICE_LIMITS).prepare()
    classifier = finished_classifier_job(settings)
    lm = finished_lm_job(data)
    with running(service_app(settings)) as origin:
        yield origin, classifier, lm


def test_service_classifier_routes_apply_the_limits(service, monkeypatch):
    from distill.service import inference

    origin, classifier, _ = service
    parsed = []
    parse = inference.parse_input
    monkeypatch.setattr(inference, "parse_input", lambda *a: parsed.append(a[2]) or parse(*a))
    cases = [
        ("completions", {"prompt": [SIGNAL] * 2000, "n": 128}, "too_many_prompts", "prompt"),  # the case
        ("completions", {"prompt": [SIGNAL] * 5}, "too_many_prompts", "prompt"),
        ("completions", {"prompt": SIGNAL, "n": 4}, "n_too_large", "n"),
        ("completions", {"prompt": [SIGNAL] * 3, "n": 3}, "too_many_sequences", "n"),
        ("chat/completions", {"messages": [{"role": "user", "content": SIGNAL}], "n": 4}, "n_too_large", "n"),
    ]
    with httpx.Client(base_url=f"{origin}/v1", timeout=30) as http:
        for path, fields, code, param in cases:
            response = http.post(f"/{path}", json={"model": classifier, **fields})
            refused(response, 400, code, param)
            assert len(response.content) < 1000
        assert parsed == []  # refused before any input was parsed
        ok = http.post("/completions", json={"model": classifier, "prompt": [SIGNAL] * 2, "n": 3})
        assert ok.status_code == 200 and len(ok.json()["choices"]) == 6


def test_service_classifier_input_nested_too_deep_is_a_400(service):
    origin, classifier, _ = service
    with httpx.Client(base_url=f"{origin}/v1", timeout=30) as http:
        for depth in (70, 100_000):  # past the bound; deep enough to overflow json.loads' recursion
            text = "[" * depth + "]" * depth
            chat = http.post(
                "/chat/completions", json={"model": classifier, "messages": [{"role": "user", "content": text}]}
            )
            refused(chat, 400, "json_too_deep", "messages")
            completion = http.post("/completions", json={"model": classifier, "prompt": [SIGNAL, text]})
            refused(completion, 400, "json_too_deep", "prompt.1")
        shallow = "[" * 60 + "1" + "]" * 60  # within the bound: parsed, and wrong for its shape
        refused(http.post("/completions", json={"model": classifier, "prompt": shallow}), 400, "invalid_input")


def test_service_lm_students_get_the_service_limits(service):
    origin, _, lm = service
    with httpx.Client(base_url=f"{origin}/v1", timeout=60) as http:
        refused(http.post("/completions", json={"model": lm, "prompt": "a", "n": 4}), 400, "n_too_large", "n")
        refused(
            http.post("/completions", json={"model": lm, "prompt": "a", "max_tokens": 51}),
            400,
            "max_tokens_too_large",
            "max_tokens",
        )
        chat = http.post("/chat/completions", json={"model": lm, "messages": MESSAGES, "temperature": 1.0, "seed": 1})
        assert chat.status_code == 200 and chat.json()["usage"]["completion_tokens"] <= SERVICE_LIMITS.max_tokens


@pytest.mark.parametrize("stream", [False, True])
def test_service_lm_generation_stops_when_the_client_leaves(service, slow_steps, stream):
    origin, _, lm = service
    body = {"model": lm, "prompt": "the movie was", "max_tokens": 50, "n": 2, "stream": stream}
    left = post_then_leave(origin, "/v1/completions", body, slow_steps)
    delay = assert_work_stops(slow_steps, left, planned=50)
    print(f"service stream={stream}: work stopped {delay * 1000:.0f} ms after the client left")
