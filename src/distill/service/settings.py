"""Where the service keeps its state and how it behaves: one frozen dataclass, built by the CLI (or a test).

The data directory holds everything a restart must find again:

    <data_dir>/distill.db        the SQLite store (unless a PostgreSQL URL is given)
    <data_dir>/files/<id><ext>   uploaded files
    <data_dir>/jobs/<id>/        each job's output folder (checkpoints, models, report, metrics)
    <data_dir>/store/            generated data sets and extracted or fine-tuned models, shared by the jobs
"""

from __future__ import annotations

import ipaddress
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from distill.asgi import ServeLimits
from distill.errors import DistillError

DEFAULT_DATA_DIR = Path("distill-service")
MiB = 1024 * 1024


def is_loopback(host: str) -> bool:
    """True for localhost and loopback addresses (127.0.0.0/8, ::1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class Settings:
    """Every knob of the service and its workers.

    data_dir:          the folder above; created if missing
    database_url:      `postgresql://user@host:port/db` for PostgreSQL; None for SQLite in the data directory
    datasets_dir:      the reference data sets (sst2/, stsb/, agnews/) for the text recipes; read only
    require_keys:      every request needs an API key even before one exists (set when listening beyond loopback)
    max_upload_bytes:  largest uploaded file
    max_body_bytes:    largest JSON request body
    lease_seconds:     how long a worker's claim on a job lasts without a heartbeat
    heartbeat_seconds: how often a running worker renews its lease (default: a third of the lease)
    max_attempts:      claims of one job (the first run and resumptions after a lost worker) before it fails
    poll_seconds:      how often an idle worker looks for work
    progress_seconds:  least time between two stored progress events of a running job
    teachers:          teacher endpoints that `generate` jobs may call, by name: {name: (base_url, api_key)}
    serve_limits:      what one inference request may ask (prompts, n, max_tokens, sequences), as `distill serve`
    """

    data_dir: Path = DEFAULT_DATA_DIR
    database_url: str | None = None
    datasets_dir: Path | None = None
    require_keys: bool = False
    max_upload_bytes: int = 512 * MiB
    max_body_bytes: int = 1 * MiB
    lease_seconds: float = 30.0
    heartbeat_seconds: float | None = None
    max_attempts: int = 3
    poll_seconds: float = 1.0
    progress_seconds: float = 1.0
    teachers: dict[str, tuple[str, str | None]] = field(default_factory=dict)
    serve_limits: ServeLimits = field(default_factory=ServeLimits)

    def __post_init__(self) -> None:
        if self.lease_seconds <= 0 or self.max_attempts < 1 or self.poll_seconds <= 0:
            raise DistillError("lease_seconds and poll_seconds must be positive and max_attempts at least 1")
        if self.heartbeat_seconds is not None and not 0 < self.heartbeat_seconds < self.lease_seconds:
            raise DistillError(
                f"heartbeat_seconds ({self.heartbeat_seconds}) must be positive and shorter than the lease "
                f"({self.lease_seconds})"
            )

    @property
    def heartbeat(self) -> float:
        return self.heartbeat_seconds if self.heartbeat_seconds is not None else self.lease_seconds / 3

    @property
    def files_dir(self) -> Path:
        return self.data_dir / "files"

    @property
    def jobs_dir(self) -> Path:
        return self.data_dir / "jobs"

    @property
    def store_dir(self) -> Path:
        return self.data_dir / "store"

    @property
    def url(self) -> str:
        """The SQLAlchemy URL of the store."""
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'distill.db').resolve()}"

    def redact(self, message: str) -> str:
        """`message` without the server's paths: an uploaded file's path becomes its id (`file-...`), a job's output
        folder its id (`job-.../student/...`), the store and the data directory a name in angle brackets."""
        for base in {str(self.data_dir), str(self.data_dir.resolve())}:
            files, jobs = re.escape(str(Path(base) / "files")), re.escape(str(Path(base) / "jobs"))
            message = re.sub(files + r"/(file-[0-9a-f]{24})\.[a-z]+", r"\1", message)
            message = re.sub(jobs + r"/(job-[0-9a-f]{24})(?:/output)?", r"\1", message)
            message = message.replace(str(Path(base) / "store"), "<store>").replace(base, "<data directory>")
        if self.datasets_dir is not None:
            for base in {str(self.datasets_dir), str(self.datasets_dir.resolve())}:
                message = message.replace(base, "<datasets>")
        return message

    def prepare(self) -> Settings:
        """Create the data directory's folders; return self."""
        for folder in (self.data_dir, self.files_dir, self.jobs_dir, self.store_dir):
            folder.mkdir(parents=True, exist_ok=True)
        return self


def teachers_from_env(environ: dict[str, str] | None = None) -> dict[str, tuple[str, str | None]]:
    """Teacher endpoints for `generate` jobs from `DISTILL_TEACHERS="name=https://host/v1;other=..."`; the API key
    of `name` comes from `DISTILL_TEACHER_KEY_<NAME>` (upper case) when set."""
    env = os.environ if environ is None else environ
    table: dict[str, tuple[str, str | None]] = {}
    for item in filter(None, (part.strip() for part in env.get("DISTILL_TEACHERS", "").split(";"))):
        name, sep, url = item.partition("=")
        if not sep or not name.strip() or not url.strip().startswith(("http://", "https://")):
            raise DistillError(f"DISTILL_TEACHERS entry {item!r} is not of the form name=http(s)://host/v1")
        key = env.get(f"DISTILL_TEACHER_KEY_{name.strip().upper().replace('-', '_')}")
        table[name.strip()] = (url.strip().rstrip("/"), key or None)
    return table


def from_env(data_dir: Path | None = None, **overrides: object) -> Settings:
    """Settings with the database URL from `DATABASE_URL` and the teacher endpoints from `DISTILL_TEACHERS`."""
    values: dict[str, object] = {
        "data_dir": data_dir or DEFAULT_DATA_DIR,
        "database_url": os.environ.get("DATABASE_URL") or None,
        "teachers": teachers_from_env(),
    }
    values.update({k: v for k, v in overrides.items() if v is not None})
    return Settings(**values)  # type: ignore[arg-type]
