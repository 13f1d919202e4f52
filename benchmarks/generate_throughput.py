"""Does `generate` keep a rate-limited teacher API busy?

A fake OpenAI-compatible server (tests/_fake_openai.py, uvicorn in a child process on loopback) answers each request
after a fixed delay and serves at most C requests at once (the rest queue), so no client can do better than C / delay
requests per second. `generate` samples one answer for each of P prompts with client concurrency >= C into a fresh
JSONL file; the benchmark reports

    ratio = achieved requests/s / (C / delay)        target >= 0.90 (headline: `generate` at client concurrency 2C)

for the whole `generate` call (reading the output file, planning, writing every row included) and, as a reference,
for bare `TeacherClient.chat` calls gathered in one event loop. At client concurrency C each request's client-side time
adds to its server slot's cycle; at 2C requests wait at the server, which hides it. Each configuration runs
`--rounds` times; the figures are medians. Also reported, to say where a gap comes from: the server's own count of
requests in flight at once (C must be reached and not exceeded), the share of its C slots that were busy (near 1:
the client kept the server saturated), the mean time a request held a slot (the delay plus the server's timer
lateness when it is short of CPU) and the CPU milliseconds per request of the client and of the server process,
which share this machine's cores. Writes benchmarks/results/generate_throughput.json.

    python benchmarks/generate_throughput.py [--prompts 800] [--delay 0.05] [--server-concurrency 16] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from _procstat import process_cpu
from distill.generate import PromptRecord, generate
from distill.generate.client import TeacherClient

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from _fake_openai import FakeOpenAI, fake_openai  # noqa: E402

RESULTS = Path(__file__).parent / "results"


def event_loop() -> str:
    """The event loop both processes run on: uvloop where installed (extra `service`), else asyncio's own."""
    try:
        import uvloop
    except ImportError:
        return "asyncio"
    return f"uvloop {uvloop.__version__}"


def run_generate(server: FakeOpenAI, prompts: list[PromptRecord], concurrency: int) -> tuple[float, int]:
    """Requests per second of one `generate` call into a fresh file, and the requests it made."""
    client = TeacherClient(server.url, "fake", concurrency=concurrency)
    with tempfile.TemporaryDirectory() as folder:
        start = time.perf_counter()
        summary = generate(prompts, client, Path(folder) / "out.jsonl")
        elapsed = time.perf_counter() - start
    if summary.written != len(prompts) or summary.failed:
        raise RuntimeError(f"generate wrote {summary.written} of {len(prompts)} rows ({summary.failed} failed)")
    return summary.requests / elapsed, summary.requests


def run_bare(server: FakeOpenAI, prompts: list[PromptRecord], concurrency: int) -> tuple[float, int]:
    """Requests per second of bare `TeacherClient.chat` calls, all gathered at once."""
    client = TeacherClient(server.url, "fake", concurrency=concurrency)

    async def main() -> int:
        try:
            answers = await asyncio.gather(
                *(client.chat([{"role": "user", "content": p.prompt or ""}]) for p in prompts)
            )
        finally:
            await client.aclose()
        return len(answers)

    start = time.perf_counter()
    count = asyncio.run(main())
    return count / (time.perf_counter() - start), count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=800)
    parser.add_argument("--delay", type=float, default=0.05, help="seconds the server takes per request")
    parser.add_argument("--server-concurrency", type=int, default=16, help="requests the server serves at once")
    parser.add_argument("--client-concurrency", type=int, nargs="+", default=None, help="default: C and 2C")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    c, delay = args.server_concurrency, args.delay
    ideal = c / delay
    prompts = [PromptRecord(prompt=f"what is {i} + {i + 1} ?") for i in range(args.prompts)]
    rows: list[dict[str, Any]] = []
    load_start = os.getloadavg()[0]
    with fake_openai(delay=delay, max_concurrency=c) as server:
        run_bare(server, prompts[:64], c)  # warm up both processes
        for concurrency in args.client_concurrency or [c, 2 * c]:
            for name, runner in (("generate", run_generate), ("bare chat", run_bare)):
                rates, peaks, client_ms, server_ms, busy, slots = [], [], [], [], [], []
                for _ in range(args.rounds):
                    server.configure(delay=delay, max_concurrency=c)
                    client_cpu, server_cpu = time.process_time(), process_cpu(server.process.pid)
                    start = time.perf_counter()
                    rate, requests = runner(server, prompts, concurrency)
                    elapsed = time.perf_counter() - start
                    client_ms.append(1000 * (time.process_time() - client_cpu) / requests)
                    server_end = process_cpu(server.process.pid)
                    if server_cpu is not None and server_end is not None:
                        server_ms.append(1000 * (server_end - server_cpu) / requests)
                    stats = server.stats()
                    if stats["requests"] != requests:
                        raise RuntimeError(f"the server saw {stats['requests']} requests, the client {requests}")
                    rates.append(rate)
                    peaks.append(stats["max_in_flight"])
                    busy.append(stats["slot_seconds"] / (c * elapsed))
                    slots.append(1000 * stats["slot_seconds"] / requests)
                rate = statistics.median(rates)
                rows.append(
                    {
                        "path": name,
                        "client_concurrency": concurrency,
                        "requests_per_s": rate,
                        "rounds": rates,
                        "ratio": rate / ideal,
                        "server_max_in_flight": max(peaks),
                        "server_slots_busy": statistics.median(busy),
                        "server_mean_slot_ms": statistics.median(slots),
                        "client_cpu_ms_per_request": statistics.median(client_ms),
                        "server_cpu_ms_per_request": statistics.median(server_ms) if server_ms else None,
                    }
                )

    table = Table(title=f"generate throughput: {args.prompts} prompts, server C={c}, delay {1000 * delay:g} ms")
    columns = (
        "path",
        "client conc.",
        "req/s",
        "ideal",
        "ratio",
        "max in flight",
        "slots busy",
        "slot ms",
        "CPU ms/req",
    )
    for column in columns:
        table.add_column(column, justify="left" if column == "path" else "right")
    for row in rows:
        table.add_row(
            row["path"],
            str(row["client_concurrency"]),
            f"{row['requests_per_s']:.1f}",
            f"{ideal:.1f}",
            f"{row['ratio']:.3f}",
            str(row["server_max_in_flight"]),
            f"{row['server_slots_busy']:.3f}",
            f"{row['server_mean_slot_ms']:.1f}",
            f"{row['client_cpu_ms_per_request']:.2f} + {row['server_cpu_ms_per_request'] or 0:.2f}",
        )
    Console(width=160).print(table)
    print(
        "slots busy: the share of the server's C slots in use; slot ms: time per request in a slot (the delay, plus"
        " timer lateness); CPU ms/req: client + server process"
    )

    top = max(row["client_concurrency"] for row in rows)
    headline = next(r["ratio"] for r in rows if r["path"] == "generate" and r["client_concurrency"] == top)
    result = {
        "benchmark": "generate_throughput",
        "prompts": args.prompts,
        "delay_s": delay,
        "server_concurrency": c,
        "ideal_requests_per_s": ideal,
        "rounds": args.rounds,
        "results": rows,
        "headline": f"generate at client concurrency {top}",
        "ratio": headline,
        "target_ratio": 0.90,
        "meets_target": headline >= 0.90,
        "event_loop": event_loop(),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "load_average_1min": {"start": load_start, "end": os.getloadavg()[0]},
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "generate_throughput.json").write_text(json.dumps(result, indent=2) + "\n")
    verdict = "meets" if headline >= 0.90 else "misses"
    print(f"generate ratio {headline:.3f} {verdict} the 0.90 target; wrote {RESULTS / 'generate_throughput.json'}")


if __name__ == "__main__":
    main()
