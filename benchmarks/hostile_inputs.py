"""Hostile requests against a live `distill service` and a live `distill serve`, both on loopback.

Each case sends what a hostile or careless client would (huge or chunked bodies without a key, decompression bombs,
JSON nested 100,000 deep, numbers beyond 64 bits, out-of-range job parameters, links out of a job folder, requests
from another site, prompts x n beyond reason, a client that leaves mid-generation...) and *holds* when the server
answers as it should: the expected 4xx in OpenAI's error shape, never a 500, and, for the cases where memory was the
problem, a peak RSS of the server that grows by less than 64 MB while it handles the request. Prints a table and
writes benchmarks/results/hostile_inputs.json: tried, held, failed, and each server's peak memory during the run.

    python benchmarks/hostile_inputs.py
"""

from __future__ import annotations

import io
import json
import os
import platform
import select
import socket
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from rich.console import Console
from rich.table import Table

from _procstat import process_cpu

RESULTS = Path(__file__).parent / "results"
MB = 1024 * 1024
MEMORY_BOUND = 64 * MB


# ----------------------------------------------------------------------------------------------------------------
# Processes and their memory
# ----------------------------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def memory(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak) of a process, in bytes."""
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, rest = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            values[name] = int(rest.split()[0]) * 1024
    return values


class Peak:
    """How far a process's peak RSS rises above its RSS at the start (the peak is reset through clear_refs)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        Path(f"/proc/{pid}/clear_refs").write_text("5")
        self.start = memory(pid)["VmRSS"]

    def growth(self) -> int:
        return memory(self.pid)["VmHWM"] - self.start


def distill(*args: object, **popen: Any) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("DATABASE_URL", None)
    return subprocess.Popen([sys.executable, "-m", "distill.cli", *map(str, args)], env=env, **popen)


def cli(*args: object) -> str:
    process = distill(*args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stdout, stderr = process.communicate(timeout=120)
    if process.returncode != 0:
        raise RuntimeError(f"distill {' '.join(map(str, args))} failed: {stderr}")
    return stdout.strip()


@dataclass
class Server:
    process: subprocess.Popen
    url: str
    port: int
    peak_rss: int = 0

    def wait(self, path: str, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited with {self.process.returncode}")
            try:
                if httpx.get(self.url + path, timeout=1).status_code < 500:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError("the server did not start")

    def stop(self) -> None:
        self.peak_rss = max(self.peak_rss, memory(self.process.pid)["VmHWM"])
        self.process.terminate()
        self.process.wait(30)


# ----------------------------------------------------------------------------------------------------------------
# Requests a normal client library would not send
# ----------------------------------------------------------------------------------------------------------------


def raw_request(port: int, head: str, chunks: Iterator[bytes], *, chunked: bool) -> int:
    """Send a request by hand (a chunked body needs no Content-Length), keep sending its body until the server
    answers or closes, and return the answer's status."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=60)
    try:
        sock.sendall(head.encode() + b"\r\n")
        for chunk in chunks:
            if select.select([sock], [], [], 0)[0]:
                break
            try:
                sock.sendall(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n" if chunked else chunk)
            except (BrokenPipeError, ConnectionResetError):
                break
        else:
            if chunked:
                sock.sendall(b"0\r\n\r\n")
        return int(sock.recv(4096).split(b" ", 2)[1])
    finally:
        sock.close()


def zeros(total: int, chunk: int = MB) -> Iterator[bytes]:
    for start in range(0, total, chunk):
        yield b"0" * min(chunk, total - start)


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


def npz_bytes(shape: tuple[int, ...], zeros_too: bool) -> bytes:
    """An .npz with one float64 array declared as `shape`: its zeros streamed in (a bomb), or no data at all."""
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<f8", "fortran_order": False, "shape": shape})
    buffer = io.BytesIO()
    block, total = bytes(8 * MB), 8 * int(np.prod(shape)) if zeros_too else 0
    with (
        zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive,
        archive.open("x.npy", "w", force_zip64=True) as out,
    ):
        out.write(header.getvalue())
        for start in range(0, total, len(block)):
            out.write(block[: min(len(block), total - start)])
    return buffer.getvalue()


def openai_error(response: httpx.Response, *statuses: int) -> bool:
    """The status is one of `statuses` and the body has OpenAI's error shape."""
    if response.status_code not in statuses:
        return False
    try:
        body = response.json()
    except ValueError:
        return False
    return isinstance(body, dict) and isinstance(body.get("error"), dict) and "message" in body["error"]


# ----------------------------------------------------------------------------------------------------------------
# Cases
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class Case:
    server: str
    name: str
    check: Callable[[], tuple[bool, str]]
    memory: bool = False  # the peak RSS of the server must stay within MEMORY_BOUND


@dataclass
class Outcome:
    server: str
    name: str
    held: bool
    detail: str
    rss_growth_mb: float | None
    seconds: float


def run_case(case: Case, pid: int) -> Outcome:
    peak = Peak(pid) if case.memory else None
    started = time.perf_counter()
    try:
        held, detail = case.check()
    except Exception as error:  # a case that cannot even be sent counts as failed
        held, detail = False, f"{type(error).__name__}: {error}"
    growth = peak.growth() if peak is not None else None
    if growth is not None and growth >= MEMORY_BOUND:
        held, detail = False, f"{detail}; peak RSS grew {growth / MB:.0f} MB"
    mb = None if growth is None else round(growth / MB, 1)
    return Outcome(case.server, case.name, held, detail, mb, round(time.perf_counter() - started, 2))


def status_is(response: httpx.Response, *statuses: int) -> tuple[bool, str]:
    return openai_error(response, *statuses), f"{response.status_code} {response.text[:120]}"


def service_cases(service: Server, data_dir: Path, key: str) -> list[Case]:
    api, auth = service.url + "/v1", {"Authorization": f"Bearer {key}"}
    anonymous, client = httpx.Client(timeout=120), httpx.Client(timeout=120, headers=auth)
    head = f"POST /v1/jobs HTTP/1.1\r\nHost: 127.0.0.1:{service.port}\r\nContent-Type: application/json\r\n"

    def job(config: Any, kind: str = "recipe") -> httpx.Response:
        return client.post(api + "/jobs", json={"kind": kind, "config": config})

    def raw_json(path: str, body: str) -> httpx.Response:
        return client.post(api + path, content=body, headers={"content-type": "application/json"})

    def upload(name: str, content: bytes) -> httpx.Response:
        return client.post(api + "/files", files={"file": (name, content)})

    def chunked(headers: str, total: int, expected: int) -> tuple[bool, str]:
        status = raw_request(
            service.port, head + headers + "Transfer-Encoding: chunked\r\n", zeros(total), chunked=True
        )
        return status == expected, str(status)

    cases = [
        Case("service", "chunked 256 MiB body, no key", lambda: chunked("", 256 * MB, 401), True),
        Case(
            "service",
            "declared 256 MiB body, no key",
            lambda: (
                raw_request(service.port, head + f"Content-Length: {256 * MB}\r\n", zeros(MB), chunked=False) == 401,
                "401 expected",
            ),
            True,
        ),
        Case(
            "service",
            "chunked 256 MiB body with a key",
            lambda: chunked(f"Authorization: Bearer {key}\r\n", 256 * MB, 413),
            True,
        ),
        Case(
            "service",
            "npz bomb: 900 MB of zeros in under 1 MB",
            lambda: status_is(upload("bomb.npz", npz_bytes((900 * 1000 * 1000 // 8,), True)), 422),
            True,
        ),
        Case(
            "service",
            "npz declaring a (10^11,) float64 array",
            lambda: status_is(upload("lie.npz", npz_bytes((10**11,), False)), 422),
            True,
        ),
        Case(
            "service",
            "JSONL upload nested 100,000 deep",
            lambda: status_is(upload("d.jsonl", ('{"a": ' + nested(100_000) + "}\n").encode()), 422),
            True,
        ),
        Case(
            "service", "CSV upload with invalid UTF-8", lambda: status_is(upload("l.csv", b"a,label\n0.5,\xff\n"), 422)
        ),
        Case(
            "service",
            "JSONL upload with invalid UTF-8",
            lambda: status_is(upload("l.jsonl", b'{"prompt": "caf\xe9"}\n'), 422),
        ),
        Case(
            "service",
            "job body nested 100,000 deep",
            lambda: status_is(raw_json("/jobs", '{"config": ' + nested(100_000) + "}"), 400),
            True,
        ),
        Case(
            "service",
            "chat body nested 100,000 deep",
            lambda: status_is(raw_json("/chat/completions", '{"messages": ' + nested(100_000) + "}"), 400),
            True,
        ),
        Case(
            "service",
            "completions body nested 100,000 deep",
            lambda: status_is(raw_json("/completions", '{"prompt": ' + nested(100_000) + "}"), 400),
            True,
        ),
        Case("service", "job: transfer_size 10^12", lambda: status_is(job({"transfer_size": 10**12}), 422)),
        Case("service", "job: epochs 10^30", lambda: status_is(job({"epochs": 10**30}), 422)),
        Case(
            "service",
            "job: a 65,536-wide 64-deep student",
            lambda: status_is(job({"student": {"family": "mlp", "width": 65536, "depth": 64}}), 422),
        ),
        Case("service", "job: seed 10^30", lambda: status_is(job({"seed": 10**30}), 422)),
        Case(
            "service",
            "job: temperature Infinity",
            lambda: status_is(raw_json("/jobs", '{"config": {"loss": {"temperature": Infinity}}}'), 422),
        ),
        Case(
            "service",
            "job: temperature NaN",
            lambda: status_is(raw_json("/jobs", '{"config": {"loss": {"temperature": NaN}}}'), 422),
        ),
    ]
    cases += event_cases(service, client, api)
    cases += report_and_error_cases(service, client, api, data_dir)
    cases += key_cases(service, anonymous, api, data_dir, key)
    return cases


def event_cases(service: Server, client: httpx.Client, api: str) -> list[Case]:
    job_id = client.post(api + "/jobs", json={"kind": "recipe", "config": {"epochs": 1}}).json()["id"]
    events = f"{api}/jobs/{job_id}/events"
    return [
        Case("service", "events after=2^64", lambda: status_is(client.get(events, params={"after": 2**64}), 422)),
        Case(
            "service",
            "Last-Event-ID of 30 digits",
            lambda: status_is(client.get(events, headers={"Last-Event-ID": "9" * 30}), 422),
        ),
        Case(
            "service",
            "Last-Event-ID a non-ASCII digit",
            lambda: status_is(client.get(events, headers={"Last-Event-ID": b"\xb2"}), 422),
        ),
        Case(
            "service",
            "dashboard events after=2^70",
            lambda: (
                client.get(f"{service.url}/ui/jobs/{job_id}/events", params={"after": 2**70}).status_code
                in (303, 401, 422),
                "refused",
            ),
        ),
    ]


def plant_job(data_dir: Path, files: dict[str, Any]) -> str:
    """A job marked succeeded in the store, whose output folder holds `files` (text, or a Path: a link to it)."""
    from distill.service import db, jobs
    from distill.service.settings import Settings

    settings = Settings(data_dir=data_dir)
    engine = db.open_engine(settings.url, pool_size=1)
    job, _ = jobs.create(engine, "recipe", {}, name=None, created_by="local", idempotency_key=None)
    with db.write(engine) as connection:
        connection.execute(db.jobs.update().where(db.jobs.c.id == job["id"]).values(status="succeeded"))
    engine.dispose()
    output = settings.jobs_dir / job["id"] / "output"
    output.mkdir(parents=True)
    for name, content in files.items():
        if isinstance(content, Path):
            (output / name).symlink_to(content)
        elif callable(content):
            content(output / name)
        else:
            (output / name).write_text(content)
    return str(job["id"])


def tiny_classifier(folder: Path) -> None:
    from distill import models
    from distill.config import ModelSpec

    spec = ModelSpec(family="mlp", width=8, depth=1)
    models.save(models.build(spec, (4,), 3), folder, spec, (4,), 3)


def report_and_error_cases(service: Server, client: httpx.Client, api: str, data_dir: Path) -> list[Case]:
    secret = data_dir.parent / "secret.txt"
    secret.write_text("outside the job folder")
    linked = plant_job(data_dir, {"report.md": secret, "metrics.json": secret})
    classifier = plant_job(data_dir, {"student": tiny_classifier})
    prompts = [json.dumps([0.0, 0.1, 0.2, 0.3])] * 2000
    many = {"model": classifier, "prompt": prompts, "n": 128}

    def report_link() -> tuple[bool, str]:
        answer = client.get(f"{api}/jobs/{linked}/report", params={"format": "md"})
        return openai_error(answer, 404) and "outside" not in answer.text, f"{answer.status_code}"

    return [
        Case("service", "report.md linked out of the job folder", report_link),
        Case(
            "service",
            "classifier: 2,000 prompts x n=128",
            lambda: status_is(client.post(api + "/completions", json=many), 400),
            True,
        ),
        Case(
            "service",
            "classifier: a prompt nested 100,000 deep",
            lambda: status_is(
                client.post(api + "/completions", json={"model": classifier, "prompt": nested(100_000)}), 400
            ),
        ),
    ]


def open_mode_cases(service: Server) -> list[Case]:
    """Before any key exists (loopback only): a page of another site must not be able to use the service."""
    client = httpx.Client(timeout=60)

    def cross_site() -> tuple[bool, str]:
        files = {"file": ("a.txt", b"hi\n")}
        answer = client.post(service.url + "/v1/files", files=files, headers={"Origin": "http://evil.test"})
        return status_is(answer, 403)

    def headers() -> tuple[bool, str]:
        page = client.get(service.url + "/ui/login")
        csp = page.headers.get("content-security-policy", "")
        held = "script-src 'self'" in csp and page.headers.get("x-frame-options") == "DENY"
        return held and page.headers.get("x-content-type-options") == "nosniff", csp[:60]

    return [
        Case("service", "open mode: an upload from another site (Origin)", cross_site),
        Case("service", "dashboard security headers", headers),
    ]


def key_cases(service: Server, anonymous: httpx.Client, api: str, data_dir: Path, key: str) -> list[Case]:
    def revoke_then_anonymous() -> tuple[bool, str]:
        cli("service", "keys", "revoke", key.split("-")[1], "--data-dir", data_dir)
        time.sleep(2.5)  # the key cache's ttl
        listed = anonymous.get(api + "/jobs")
        minted = anonymous.post(api + "/keys", json={"scopes": ["admin"]})
        return openai_error(listed, 401) and openai_error(minted, 401), f"{listed.status_code}, {minted.status_code}"

    return [
        Case(
            "service",
            "/openapi.json without a key",
            lambda: status_is(anonymous.get(service.url + "/openapi.json"), 401),
        ),
        Case("service", "/docs without a key", lambda: status_is(anonymous.get(service.url + "/docs"), 401)),
        Case("service", "revoke the only key, then no key / mint an admin key", revoke_then_anonymous),
    ]


# ----------------------------------------------------------------------------------------------------------------
# distill serve
# ----------------------------------------------------------------------------------------------------------------


def tiny_lm(directory: Path) -> None:
    """A random GPT-2 (context 2,048) over 5,000 made-up words, so that a random generation rarely ends early."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    tokens = ["<eos>", "<unk>", *(f"w{i}" for i in range(5000))]
    core = Tokenizer(models.WordLevel({t: i for i, t in enumerate(tokens)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<eos>", pad_token="<eos>")
    config = GPT2Config(vocab_size=len(tokens), n_positions=2048, n_embd=128, n_layer=4, n_head=4, eos_token_id=0)
    torch.manual_seed(0)
    GPT2LMHeadModel(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)


def serve_cases(server: Server) -> list[Case]:
    api = server.url + "/v1"
    client = httpx.Client(timeout=300)
    head = f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\nContent-Type: application/json\r\n"
    big_prompt = "w1 " * (16 * MB // 3)

    def complete(**fields: Any) -> httpx.Response:
        return client.post(api + "/completions", json={"model": "tiny", "prompt": "w1 w2", **fields})

    def chunked_prompt() -> tuple[bool, str]:
        body = json.dumps({"model": "tiny", "prompt": big_prompt}).encode()
        parts = (body[i : i + MB] for i in range(0, len(body), MB))
        status = raw_request(server.port, head + "Transfer-Encoding: chunked\r\n", parts, chunked=True)
        return status == 413, str(status)

    cases = [
        Case("serve", "a 16 MB prompt", lambda: status_is(complete(prompt=big_prompt), 413), True),
        Case("serve", "a 16 MB prompt, chunked", chunked_prompt, True),
        Case(
            "serve",
            "200 prompts x n=128 x 200 tokens",
            lambda: status_is(complete(prompt=["w1 w2"] * 200, n=128, max_tokens=200), 400),
            True,
        ),
        Case("serve", "n=1,000", lambda: status_is(complete(n=1000), 400, 422)),
        Case("serve", "max_tokens 10^9", lambda: status_is(complete(max_tokens=10**9), 400)),
        Case(
            "serve",
            "temperature Infinity",
            lambda: status_is(
                client.post(
                    api + "/completions",
                    content='{"model": "tiny", "prompt": "w1", "temperature": Infinity}',
                    headers={"content-type": "application/json"},
                ),
                400,
                422,
            ),
        ),
        Case(
            "serve",
            "chat body nested 100,000 deep",
            lambda: status_is(
                client.post(
                    api + "/chat/completions",
                    content='{"model": "tiny", "messages": ' + nested(100_000) + "}",
                    headers={"content-type": "application/json"},
                ),
                400,
            ),
            True,
        ),
        Case("serve", "malformed fields (422 in OpenAI's shape)", lambda: status_is(complete(top_p=7), 400, 422)),
        Case("serve", "unknown model", lambda: status_is(complete(model="nope"), 404)),
        Case("serve", "a client that leaves mid-generation (streamed)", lambda: leaves(server, stream=True)),
        Case("serve", "a client that leaves mid-generation", lambda: leaves(server, stream=False)),
        Case("serve", "tokenizing the longest prompt allowed stalls nobody", lambda: not_stalled(server)),
        Case(
            "serve",
            "a 3 MB prompt is refused before tokenizing",
            lambda: status_is(complete(prompt="w1 " * MB), 400),
            True,
        ),
    ]
    return cases


def leaves(server: Server, stream: bool) -> tuple[bool, str]:
    """Ask for 16 long generations, leave after 0.5 s; the server's CPU use must fall to idle within a second."""
    body = {"model": "tiny", "prompt": "w1 w2", "n": 16, "max_tokens": 2000, "temperature": 1.0, "stream": stream}

    def send() -> None:
        deadline = time.monotonic() + 0.5
        try:
            with httpx.Client(timeout=0.5) as client, client.stream("POST", server.url + "/v1/completions",
                                                                    json=body) as answer:  # fmt: skip
                for _ in answer.iter_bytes():
                    if time.monotonic() > deadline:
                        break  # leaving the block closes the connection: the client leaves
        except httpx.HTTPError:
            pass  # no byte within 0.5 s: the client leaves

    start = process_cpu(server.process.pid) or 0.0
    sender = threading.Thread(target=send)
    sender.start()
    sender.join()
    working = (process_cpu(server.process.pid) or 0.0) - start
    time.sleep(1.0)
    before = process_cpu(server.process.pid) or 0.0
    time.sleep(1.0)
    busy = (process_cpu(server.process.pid) or 0.0) - before
    held = busy < 0.2 and working > 0.2  # it was generating while the client stayed
    return held, f"CPU s while connected {working:.2f}, in the 2nd second after leaving {busy:.2f}"


def not_stalled(server: Server) -> tuple[bool, str]:
    """The longest prompt the server tokenizes at all (64 characters per token of its 2,048-token context) does
    not hold up other requests while it is tokenized."""
    prompt = "w1 " * (64 * 2048 // 3 - 10)
    worst = [0.0]

    def probe(stop: threading.Event) -> None:
        with httpx.Client(timeout=30) as client:
            while not stop.is_set():
                started = time.perf_counter()
                client.get(server.url + "/v1/models")
                worst[0] = max(worst[0], time.perf_counter() - started)
                time.sleep(0.05)

    stop = threading.Event()
    prober = threading.Thread(target=probe, args=(stop,))
    prober.start()
    try:
        httpx.post(server.url + "/v1/completions", json={"model": "tiny", "prompt": prompt}, timeout=300)
    finally:
        stop.set()
        prober.join()
    return worst[0] < 1.0, f"slowest /v1/models while tokenizing: {worst[0] * 1000:.0f} ms"


# ----------------------------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------------------------


def start_service(data_dir: Path) -> Server:
    port = free_port()
    data_dir.mkdir(parents=True)
    log = (data_dir.parent / "service.log").open("w")
    process = distill("service", "--data-dir", data_dir, "--port", port, "--max-upload-mb", 16,
                      stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
    server = Server(process, f"http://127.0.0.1:{port}", port)
    server.wait("/healthz")
    return server


def start_serve(folder: Path) -> Server:
    port = free_port()
    log = (folder.parent / "serve.log").open("w")
    process = distill(
        "serve", "--model", folder, "--name", "tiny", "--port", port, stdout=log, stderr=subprocess.STDOUT
    )
    server = Server(process, f"http://127.0.0.1:{port}", port)
    server.wait("/v1/models")
    return server


def main() -> None:
    console = Console()
    outcomes: list[Outcome] = []
    servers: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        service = start_service(root / "service")
        start = memory(service.process.pid)["VmRSS"]
        outcomes += [run_case(case, service.process.pid) for case in open_mode_cases(service)]
        key = cli("service", "keys", "create", "--scopes", "admin", "--data-dir", root / "service")
        time.sleep(2.5)  # the service learns of the first key within its key cache's ttl
        outcomes += [run_case(case, service.process.pid) for case in service_cases(service, root / "service", key)]
        service.stop()
        servers["service"] = {"rss_at_start_mb": round(start / MB, 1), "peak_rss_mb": round(service.peak_rss / MB, 1)}
        tiny_lm(root / "tiny")
        serve = start_serve(root / "tiny")
        start = memory(serve.process.pid)["VmRSS"]
        outcomes += [run_case(case, serve.process.pid) for case in serve_cases(serve)]
        serve.stop()
        servers["serve"] = {"rss_at_start_mb": round(start / MB, 1), "peak_rss_mb": round(serve.peak_rss / MB, 1)}
    table = Table(title="hostile inputs")
    for column in ("server", "case", "held", "RSS growth MB", "s", "detail"):
        table.add_column(column)
    for o in outcomes:
        growth = "" if o.rss_growth_mb is None else f"{o.rss_growth_mb:.1f}"
        table.add_row(o.server, o.name, "yes" if o.held else "[red]NO[/red]", growth, f"{o.seconds:.1f}", o.detail[:60])
    console.print(table)
    held = sum(o.held for o in outcomes)
    console.print(f"tried {len(outcomes)}, held {held}, failed {len(outcomes) - held}; servers: {servers}")
    RESULTS.mkdir(exist_ok=True)
    result = {
        "tried": len(outcomes),
        "held": held,
        "failed": len(outcomes) - held,
        "memory_bound_mb": MEMORY_BOUND / MB,
        "servers": servers,
        "cases": [o.__dict__ for o in outcomes],
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "load": os.getloadavg()},
    }
    (RESULTS / "hostile_inputs.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
