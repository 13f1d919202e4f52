"""Does the service stay fast with many clients? `--clients` concurrent clients (50) create and poll jobs for
`--seconds` (60) against one `distill service` on loopback.

Each client repeats: create a job (`POST /v1/jobs`, the default recipe with a small config and an Idempotency-Key),
then poll it three times (`GET /v1/jobs/{id}`, `GET /v1/jobs/{id}/events?after=0`, `GET /v1/jobs?limit=20`),
waiting about `--think` seconds (0.25; each wait drawn between half and one and a half times that, and each
client starting at a random moment, so that clients do not move in lockstep) after each answer, as a client
polling for progress does; 50 such clients ask for up to 200 requests a second. A second phase (`--saturate` seconds, 20) drops the wait: every client sends its
next request as soon as the last is answered, which measures the most the service can answer here (with 50
requests always waiting, latency there is queueing: about clients / throughput). Every request carries an API key,
so the key check is measured too. No worker runs: the jobs stay queued, and the figures are the API's own.
Errors are failed requests or answers other than 200/201. Reported per phase: requests, errors, requests per
second, latency p50/p95/p99/max overall and per operation, and the CPU time of the service process and of the
client (they share this machine's cores, with whatever else runs on it: see the load average). The store is SQLite
in a fresh data directory, or PostgreSQL with `--database-url` (an empty database). Writes
benchmarks/results/service_load.json.

    python benchmarks/service_load.py [--clients 50] [--seconds 60] [--think 0.25] [--saturate 20]
                                      [--database-url postgresql://...]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console
from rich.table import Table

from _procstat import process_cpu

RESULTS = Path(__file__).parent / "results"
TARGET_P99_MS = 100.0
CONFIG = {"recipe": "mnist1d", "epochs": 1, "teacher_epochs": 1, "transfer_size": 0, "train_size": 100}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered)) - 1))] if ordered else float("nan")


def summary(latencies: list[float]) -> dict[str, float]:
    ms = [1000 * v for v in latencies]
    return {
        "count": len(ms),
        "p50_ms": percentile(ms, 50),
        "p95_ms": percentile(ms, 95),
        "p99_ms": percentile(ms, 99),
        "max_ms": max(ms) if ms else float("nan"),
        "mean_ms": statistics.fmean(ms) if ms else float("nan"),
    }


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Http:
    """One keep-alive HTTP/1.1 connection, as light as a client can be (httpx would spend more CPU per request than
    the service does, and both share this machine's cores)."""

    def __init__(self, host: str, port: int, headers: dict[str, str]) -> None:
        self.host, self.port = host, port
        self.headers = "".join(f"{k}: {v}\r\n" for k, v in {"Host": f"{host}:{port}", **headers}.items())
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def request(
        self, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None
    ) -> tuple[int, bytes]:
        if self.writer is None or self.reader is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        payload = json.dumps(body).encode() if body is not None else b""
        extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
        if body is not None:
            extra += f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n"
        self.writer.write(f"{method} {path} HTTP/1.1\r\n{self.headers}{extra}\r\n".encode() + payload)
        try:
            head = await self.reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionError):
            self.writer = self.reader = None
            raise
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        fields = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
        if fields.get("transfer-encoding") == "chunked":
            content = b""
            while (size := int((await self.reader.readline()).strip(), 16)) > 0:
                content += await self.reader.readexactly(size)
                await self.reader.readline()
            await self.reader.readline()
        else:
            content = await self.reader.readexactly(int(fields.get("content-length", "0")))
        if fields.get("connection") == "close":
            self.writer.close()
            self.writer = self.reader = None
        return status, content

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "distill.cli", *args], capture_output=True, text=True, env=env)


async def client_loop(
    number: int,
    http: Http,
    deadline: float,
    think: float,
    latencies: dict[str, list[float]],
    errors: list[str],
    phase: str,
) -> None:
    pause = random.Random(number)  # each client waits its own (seeded) times: clients do not move in lockstep
    await asyncio.sleep(pause.uniform(0, think))
    iteration = 0
    while time.perf_counter() < deadline:
        iteration += 1
        body = {"kind": "recipe", "config": {**CONFIG, "seed": iteration}, "name": f"load-{number}"}
        calls = [("create", "POST", "/v1/jobs", body, {"Idempotency-Key": f"{phase}-{number}-{iteration}"})]
        job_id = None
        while calls:
            name, method, path, payload, headers = calls.pop(0)
            started = time.perf_counter()
            try:
                status, content = await http.request(method, path, payload, headers)
            except (OSError, asyncio.IncompleteReadError, ValueError) as error:
                errors.append(f"{name}: {type(error).__name__}")
                break
            latencies[name].append(time.perf_counter() - started)
            if status not in (200, 201):
                errors.append(f"{name}: HTTP {status} {content[:200]!r}")
                break
            if name == "create":
                job_id = json.loads(content)["id"]
                calls = [
                    ("get", "GET", f"/v1/jobs/{job_id}", None, None),
                    ("events", "GET", f"/v1/jobs/{job_id}/events?after=0", None, None),
                    ("list", "GET", "/v1/jobs?limit=20", None, None),
                ]
            await asyncio.sleep(think * pause.uniform(0.5, 1.5))


async def load(
    url: str, key: str, clients: int, seconds: float, think: float, phase: str
) -> tuple[dict[str, list[float]], list[str], float]:
    latencies: dict[str, list[float]] = {"create": [], "get": [], "events": [], "list": []}
    errors: list[str] = []
    host, port = url.removeprefix("http://").split(":")
    connections = [Http(host, int(port), {"Authorization": f"Bearer {key}"}) for _ in range(clients)]
    for connection in connections:  # open every connection (and warm the key cache) before the clock starts
        await connection.request("GET", "/v1/jobs?limit=1")
    started = time.perf_counter()
    deadline = started + seconds
    await asyncio.gather(
        *(client_loop(i, c, deadline, think, latencies, errors, phase) for i, c in enumerate(connections))
    )
    elapsed = time.perf_counter() - started
    for connection in connections:
        await connection.close()
    return latencies, errors, elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=60.0, help="length of the paced phase")
    parser.add_argument("--think", type=float, default=0.25, help="seconds a client waits after each answer")
    parser.add_argument("--saturate", type=float, default=20.0, help="length of the phase without waits (0: none)")
    parser.add_argument("--database-url", default=None, help="PostgreSQL instead of SQLite")
    parser.add_argument("--output", type=Path, default=RESULTS / "service_load.json")
    args = parser.parse_args()

    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    if args.database_url:
        env["DATABASE_URL"] = args.database_url
    with tempfile.TemporaryDirectory() as folder:
        data = Path(folder) / "data"
        made = cli(
            "service", "keys", "create", "--scopes", "read,write", "--name", "load", "--data-dir", str(data), env=env
        )
        if made.returncode != 0:
            raise SystemExit(made.stderr)
        key = made.stdout.strip()
        port = free_port()
        log = (Path(folder) / "service.log").open("w")
        service = subprocess.Popen(
            [sys.executable, "-m", "distill.cli", "service", "--data-dir", str(data), "--port", str(port)],
            stdout=log, stderr=subprocess.STDOUT, env=env,
        )  # fmt: skip
        url = f"http://127.0.0.1:{port}"
        try:
            for _ in range(300):
                try:
                    if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    time.sleep(0.2)
            else:
                raise SystemExit("the service did not start")
            phases = {}
            for phase, seconds, think in (("paced", args.seconds, args.think), ("saturated", args.saturate, 0.0)):
                if seconds <= 0:
                    continue
                service_cpu, client_cpu, load_before = process_cpu(service.pid), time.process_time(), os.getloadavg()
                latencies, errors, elapsed = asyncio.run(load(url, key, args.clients, seconds, think, phase))
                phases[phase] = report(
                    latencies, errors, elapsed, think,
                    (process_cpu(service.pid) or 0.0) - (service_cpu or 0.0), time.process_time() - client_cpu,
                    load_before,
                )  # fmt: skip
            backend = httpx.get(f"{url}/healthz").json()["database"]
        finally:
            service.terminate()
            service.wait(30)

    result = {
        "benchmark": "service_load",
        "clients": args.clients,
        "database": backend,
        "target_p99_ms": TARGET_P99_MS,
        "phases": phases,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2))

    console = Console()
    for phase, data in phases.items():
        title = (
            f"distill service, {phase}: {args.clients} clients for {data['seconds']:.0f} s on {backend} "
            f"(think {data['think_s']} s)"
        )
        table = Table(title=title, title_justify="left")
        for column in ("operation", "requests", "p50 ms", "p95 ms", "p99 ms", "max ms"):
            table.add_column(column, justify="left" if column == "operation" else "right")
        for name, stats in [*data["by_operation"].items(), ("all", data["latency"])]:
            table.add_row(
                name, f"{stats['count']:,}", *(f"{stats[k]:.1f}" for k in ("p50_ms", "p95_ms", "p99_ms", "max_ms"))
            )
        console.print(table)
        console.print(
            f"{data['requests']:,} requests ({data['requests_per_s']:.0f}/s), {data['errors']} errors; p99 "
            f"{data['latency']['p99_ms']:.1f} ms; CPU: service {data['service_cpu_s']:.0f} s, client "
            f"{data['client_cpu_s']:.0f} s over {data['seconds']:.0f} s on {os.cpu_count()} cores (load average "
            f"{data['load_average_before'][0]:.1f} before)"
        )
    paced = phases.get("paced")
    if paced is not None:
        verdict = "meets" if paced["latency"]["p99_ms"] < TARGET_P99_MS and not paced["errors"] else "misses"
        console.print(f"paced: {verdict} the target (p99 under {TARGET_P99_MS:.0f} ms, no errors). Wrote {args.output}")


def report(
    latencies: dict[str, list[float]],
    errors: list[str],
    elapsed: float,
    think: float,
    service_cpu: float,
    client_cpu: float,
    load_before: tuple[float, float, float],
) -> dict[str, Any]:
    every = [v for values in latencies.values() for v in values]
    return {
        "seconds": elapsed,
        "think_s": think,
        "requests": len(every),
        "errors": len(errors),
        "error_examples": sorted(set(errors))[:10],
        "requests_per_s": len(every) / elapsed,
        "jobs_created": len(latencies["create"]),
        "latency": summary(every),
        "by_operation": {name: summary(values) for name, values in latencies.items()},
        "service_cpu_s": service_cpu,
        "client_cpu_s": client_cpu,
        "load_average_before": list(load_before),
    }


if __name__ == "__main__":
    main()
