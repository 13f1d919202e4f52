"""Helpers for the service tests: the real service and workers as subprocesses on loopback, a throw-away
PostgreSQL database per test, and small clients."""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

PG_ADMIN = "host=127.0.0.1 port=5432 user=postgres dbname=test connect_timeout=3"

# A default-recipe (mnist1d) job small enough for tests: a tiny MLP teacher, no transfer set, a few epochs.
TINY_RECIPE = {
    "recipe": "mnist1d",
    "train_size": 500,
    "transfer_size": 0,
    "teacher": {"family": "mlp", "width": 32, "depth": 1},
    "teacher_epochs": 2,
    "student": {"family": "mlp", "width": 16, "depth": 1},
    "epochs": 2,
}

# Long enough to be killed mid-training (the digits recipe: its data load at once): the teacher trains for about a
# thousand small steps, checkpointing every five.
SLOW_RECIPE = {
    "recipe": "digits",
    "train_size": 300,
    "transfer_size": 0,
    "teacher": {"family": "mlp", "width": 128, "depth": 2},
    "teacher_train": {"epochs": 12, "batch_size": 32, "lr": 0.002, "checkpoint_every": 5},
    "student": {"family": "mlp", "width": 16, "depth": 1},
    "student_train": {"epochs": 4, "batch_size": 64, "checkpoint_every": 5},
}
QUICK_RECIPE = {**TINY_RECIPE, "recipe": "digits", "epochs": 4}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def cli_env(database_url: str | None = None, extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "DISTILL_TEACHERS")}
    if database_url:
        env["DATABASE_URL"] = database_url
    env["OMP_NUM_THREADS"] = "1"
    return env | (extra or {})


def distill_cli(*args: object, database_url: str | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "distill.cli", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=cli_env(database_url),
    )


class Service:
    """`distill service` in a subprocess on a free loopback port."""

    def __init__(
        self,
        data_dir: Path,
        database_url: str | None = None,
        *extra: str,
        host: str = "127.0.0.1",
        env: dict[str, str] | None = None,
    ) -> None:
        self.data_dir, self.database_url, self.extra, self.host, self.env = data_dir, database_url, extra, host, env
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None
        self.log = data_dir.parent / f"service-{self.port}.log"

    def start(self, wait: bool = True) -> Service:
        handle = self.log.open("a")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "distill.cli", "service", "--data-dir", str(self.data_dir), "--host", self.host,
             "--port", str(self.port), *self.extra],
            stdout=handle,
            stderr=subprocess.STDOUT,
            env=cli_env(self.database_url, self.env),
        )  # fmt: skip
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                raise AssertionError(f"the service exited ({self.process.returncode}):\n{self.log.read_text()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    return
            time.sleep(0.2)
        raise AssertionError(f"the service did not start:\n{self.log.read_text()}")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def client(self, key: str | None = None, timeout: float = 30) -> httpx.Client:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=timeout)


class Worker:
    """`distill worker` in a subprocess, with a short lease so that a killed one is replaced quickly."""

    def __init__(
        self,
        data_dir: Path,
        database_url: str | None = None,
        name: str = "w",
        lease: float = 3.0,
        poll: float = 0.2,
        env: dict[str, str] | None = None,
    ) -> None:
        self.log = data_dir.parent / f"worker-{name}.log"
        self.process = subprocess.Popen(
            [sys.executable, "-m", "distill.cli", "worker", "--data-dir", str(data_dir), "--lease", str(lease),
             "--heartbeat", str(lease / 6), "--poll", str(poll), "--name", name, "--threads", "1"],
            stdout=self.log.open("a"),
            stderr=subprocess.STDOUT,
            env=cli_env(database_url, env),
        )  # fmt: skip
        self.name = name

    def kill(self) -> None:
        self.process.kill()
        self.process.wait()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def postgres_available() -> str | None:
    """None when the test PostgreSQL answers, else why not."""
    try:
        import psycopg

        with psycopg.connect(PG_ADMIN) as connection:
            connection.execute("SELECT 1")
    except Exception as error:  # not installed, not running, refused...
        return f"PostgreSQL at 127.0.0.1:5432 does not answer ({type(error).__name__}: {str(error).splitlines()[0]})"
    return None


@contextlib.contextmanager
def postgres_database() -> Iterator[str]:
    """A fresh database on the test server, dropped afterwards; skips the test when the server does not answer."""
    reason = postgres_available()
    if reason is not None:
        pytest.skip(reason)
    import psycopg

    name = f"distill_test_{secrets.token_hex(6)}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as connection:
        connection.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"postgresql://postgres@127.0.0.1:5432/{name}"
    finally:
        with psycopg.connect(PG_ADMIN, autocommit=True) as connection:
            connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextlib.contextmanager
def store_url(backend: str, tmp_path: Path) -> Iterator[str | None]:
    """None (SQLite in the data directory) or a fresh PostgreSQL database's URL."""
    if backend == "sqlite":
        yield None
    else:
        with postgres_database() as url:
            yield url


def wait_status(client: httpx.Client, job_id: str, statuses: tuple[str, ...], timeout: float = 180) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(f"/v1/jobs/{job_id}").json()
        if job["status"] in statuses:
            return job
        time.sleep(0.3)
    raise AssertionError(f"job {job_id} did not reach {statuses}: {job}")


def all_events(client: httpx.Client, job_id: str) -> list[dict]:
    events: list[dict] = []
    while True:
        page = client.get(f"/v1/jobs/{job_id}/events", params={"after": events[-1]["id"] if events else 0}).json()
        events += page["data"]
        if not page["has_more"]:
            return events


def stop_all(*processes: Service | Worker | None) -> None:
    for process in processes:
        if process is not None:
            process.stop()


def interrupt(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGINT)


def finished_job(data_dir: Path, config: dict | None = None, name: str | None = None) -> tuple[str, Path]:
    """A job recorded as succeeded straight into the store of the service in `data_dir`, without running it: its id
    and its (new, empty) output folder, for the test to fill with what the job would have produced."""
    from distill.service import db, jobs
    from distill.service.refs import job_output
    from distill.service.settings import Settings

    settings = Settings(data_dir=data_dir)
    engine = db.open_engine(settings.url, pool_size=1)
    job, _ = jobs.create(engine, "recipe", config or {}, name=name, created_by="local", idempotency_key=None)
    with db.write(engine) as connection:
        update = db.jobs.update().where(db.jobs.c.id == job["id"])
        connection.execute(update.values(status="succeeded", finished_at=time.time()))
    engine.dispose()
    output = job_output(settings, job["id"])
    output.mkdir(parents=True)
    return str(job["id"]), output


def finished_lm_job(data_dir: Path) -> str:
    """A job that produced a tiny random GPT-2 student (training one through the lm recipe takes a minute; tests of
    the kinds and of serving only need a finished job's causal LM)."""
    from conftest import tiny_gpt2

    job_id, output = finished_job(data_dir, {"recipe": "lm"}, "tiny-lm")
    tiny_gpt2(output / "student")
    return job_id
