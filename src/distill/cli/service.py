"""`distill service` (the REST API), `distill service keys ...` and `distill worker`: distillation as a service.

These commands read the environment (`DATABASE_URL` for PostgreSQL,
`DISTILL_TEACHERS` for the endpoints `generate` jobs may call) and build the service's `Settings` from it.
"""

from __future__ import annotations

import logging
import signal
from pathlib import Path
from typing import Any, Optional

import typer

from distill.asgi import ServeLimits
from distill.cli.app import app, out
from distill.errors import DistillError
from distill.service import settings as service_settings

LIMITS = ServeLimits()  # the defaults of the inference limits
DATA_DIR_HELP = "Folder holding the store (SQLite), uploads and job outputs; the service and its workers share it."

service_app = typer.Typer(
    help="The REST API: files, jobs with progress events, artifacts, reports, API keys, OpenAI-compatible serving.",
    invoke_without_command=True,
    no_args_is_help=False,
)
keys_app = typer.Typer(help="API keys (stored hashed; scopes read, write, infer, admin).", no_args_is_help=True)
service_app.add_typer(keys_app, name="keys")
app.add_typer(service_app, name="service")


def _logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")


def _data_dir_option() -> Any:
    return typer.Option(
        service_settings.DEFAULT_DATA_DIR, "--data-dir", envvar="DISTILL_SERVICE_DIR", help=DATA_DIR_HELP
    )


@service_app.callback(invoke_without_command=True)
def service(
    ctx: typer.Context,
    host: str = typer.Option("127.0.0.1", help="Address to listen on; beyond loopback an API key must exist first."),
    port: int = typer.Option(8000, min=1, max=65535, help="Port to listen on."),
    data_dir: Path = _data_dir_option(),
    datasets_dir: Optional[Path] = typer.Option(
        None, help="Reference data sets (sst2/, stsb/, agnews/) for the text recipes' jobs."
    ),
    max_upload_mb: int = typer.Option(
        512, min=1, max=1024 * 1024, help="Largest uploaded file, in MiB (an .npz also once unpacked)."
    ),
    max_body_kb: int = typer.Option(1024, min=1, max=1024 * 1024, help="Largest JSON request body, in KiB."),
    max_prompts: int = typer.Option(LIMITS.max_prompts, min=1, max=1_000_000, help="Prompts in one inference request."),
    max_n: int = typer.Option(
        LIMITS.max_n, min=1, max=1_000_000, help="Choices per prompt (n) in one inference request."
    ),
    max_tokens: int = typer.Option(
        LIMITS.max_tokens, min=1, max=10_000_000, help="Tokens generated per choice, at most."
    ),
    max_sequences: int = typer.Option(
        LIMITS.max_sequences,
        min=1,
        max=1_000_000,
        help="Prompts x n in one inference request (the rows it adds to a batch).",
    ),
    access_log: bool = typer.Option(False, help="Log every request."),
) -> None:
    """Start the service (FastAPI + uvicorn). The store is SQLite in the data directory, or PostgreSQL when
    DATABASE_URL is set (postgresql://user@host:port/db). Run `distill worker` beside it to run the jobs."""
    if ctx.invoked_subcommand is not None:
        return
    from distill.service.app import run

    _logging()
    if datasets_dir is not None and not datasets_dir.is_dir():
        raise DistillError(f"--datasets-dir {datasets_dir} is not a folder")
    settings = service_settings.from_env(
        data_dir,
        datasets_dir=datasets_dir.resolve() if datasets_dir else None,
        max_upload_bytes=max_upload_mb * service_settings.MiB,
        max_body_bytes=max_body_kb * 1024,
        serve_limits=ServeLimits(max_body_kb * 1024, max_prompts, max_n, max_tokens, max_sequences),
    )
    run(settings, host, port, access_log=access_log)


@keys_app.command("create")
def keys_create(
    scopes: str = typer.Option(..., help="Comma-separated: read, write, infer, admin (admin implies all)."),
    name: str = typer.Option("", help="A label, e.g. who uses the key."),
    data_dir: Path = _data_dir_option(),
) -> None:
    """Create an API key and print it (it is shown this once; only its hash is stored)."""
    from distill.service import auth, db

    settings = service_settings.from_env(data_dir).prepare()
    engine = db.open_engine(settings.url, pool_size=1)
    db.ensure_schema(engine)
    key, record = auth.create_key(engine, auth.parse_scopes(scopes), name)
    typer.echo(key)
    typer.echo(
        f"key {record['id']} with scopes {','.join(record['scopes'])}; store it now, it is not shown again", err=True
    )


@keys_app.command("list")
def keys_list(data_dir: Path = _data_dir_option()) -> None:
    """List the keys (ids, scopes, names; never the secrets)."""
    from distill.service import auth, db

    settings = service_settings.from_env(data_dir).prepare()
    engine = db.open_engine(settings.url, pool_size=1)
    db.ensure_schema(engine)
    for record in auth.list_keys(engine):
        state = "revoked" if record["revoked_at"] else "active"
        out.print(f"{record['id']}  {','.join(record['scopes']):<24} {state:<8} {record['name']}", highlight=False)


@keys_app.command("revoke")
def keys_revoke(
    key_id: str = typer.Argument(..., help="The key's id (the part after dsk-)."), data_dir: Path = _data_dir_option()
) -> None:
    """Revoke a key: requests with it are refused from then on (within two seconds)."""
    from distill.service import auth, db

    settings = service_settings.from_env(data_dir).prepare()
    engine = db.open_engine(settings.url, pool_size=1)
    if not auth.revoke_key(engine, key_id):
        raise DistillError(f"no active key with id {key_id!r}")
    out.print(f"revoked {key_id}")


@app.command()
def worker(
    data_dir: Path = _data_dir_option(),
    datasets_dir: Optional[Path] = typer.Option(None, help="Reference data sets for the text recipes' jobs."),
    lease: float = typer.Option(
        30.0, min=1.0, max=86_400.0, help="Seconds a claim on a job lasts without a heartbeat."
    ),
    heartbeat: Optional[float] = typer.Option(
        None, min=0.1, max=86_400.0, help="Seconds between heartbeats (default: a third of the lease)."
    ),
    poll: float = typer.Option(1.0, min=0.01, max=3600.0, help="Seconds between looks for work when idle."),
    max_attempts: int = typer.Option(
        3, min=1, max=1000, help="Claims of one job (resumptions after lost workers) before it fails."
    ),
    once: bool = typer.Option(False, help="Exit when the queue is empty."),
    name: Optional[str] = typer.Option(None, help="This worker's name in job events (default host-pid)."),
    threads: Optional[int] = typer.Option(
        None, min=1, max=4096, help="CPU threads for PyTorch (default: PyTorch's choice)."
    ),
) -> None:
    """Claim queued jobs and run them; start as many as the machine(s) allow. SIGTERM or Ctrl-C: the running job
    stops at its next step and goes back to the queue, where another worker resumes it from its checkpoint."""
    from distill.service import db
    from distill.service.worker import Worker

    _logging()
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    settings = service_settings.from_env(
        data_dir,
        datasets_dir=datasets_dir.resolve() if datasets_dir else None,
        lease_seconds=lease,
        heartbeat_seconds=heartbeat,
        poll_seconds=poll,
        max_attempts=max_attempts,
    ).prepare()
    engine = db.open_engine(settings.url, pool_size=4)
    db.ensure_schema(engine)
    runner = Worker(settings, engine, name)

    def stop(signum: int, _: Any) -> None:
        logging.getLogger("distill.worker").info("signal %d: stopping after the current step", signum)
        runner.stop()
        signal.signal(signal.SIGINT, signal.default_int_handler)  # a second Ctrl-C interrupts at once

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    count = runner.run(once=once)
    logging.getLogger("distill.worker").info("worker %s ran %d job(s)", runner.name, count)
