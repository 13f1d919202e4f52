"""The store's tables (SQLAlchemy Core), opening it (SQLite with WAL, or PostgreSQL), and its schema version.

Times are UNIX seconds (floats); configs, metrics and event data are JSON text, so both databases store the same.

Schema versioning: `schema_info` holds one row with the version the tables follow. `ensure_schema` creates the
tables of an empty database, upgrades an older one with the steps in `MIGRATIONS` (version n -> n + 1), and refuses
a database written by a newer distill. It runs under a lock (PostgreSQL advisory lock, SQLite write lock), so the
service and several workers may start at once.

Transactions: `read(engine)` and `write(engine)`. On SQLite a write transaction starts with `BEGIN IMMEDIATE`: it
takes the database's write lock first (waiting up to the busy timeout), so a read-then-write never fails halfway
because another process wrote in between; readers are never blocked (WAL).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Connection,
    Engine,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    create_engine,
    event,
    inspect,
    select,
    text,
)

from distill.errors import DistillError

SCHEMA_VERSION = 2
BUSY_TIMEOUT_MS = 30_000

metadata = MetaData()

schema_info = Table("schema_info", metadata, Column("version", Integer, nullable=False))

# Facts about the service that hold for good once set, by name: `keys_required` (a key was once created, so the
# service never goes back to open mode, even when every key is revoked).
service_state = Table(
    "service_state",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("value", String(200), nullable=False),
    Column("set_at", Float, nullable=False),
)

api_keys = Table(
    "api_keys",
    metadata,
    Column("id", String(40), primary_key=True),
    Column("hash", String(64), nullable=False),
    Column("scopes", String(100), nullable=False),
    Column("name", String(200), nullable=False),
    Column("created_at", Float, nullable=False),
    Column("revoked_at", Float),
)

files = Table(
    "files",
    metadata,
    Column("id", String(40), primary_key=True),
    Column("filename", String(255), nullable=False),
    Column("purpose", String(64), nullable=False),
    Column("format", String(8), nullable=False),
    Column("bytes", BigInteger, nullable=False),
    Column("sha256", String(64), nullable=False),
    Column("rows", Integer, nullable=False),
    Column("created_by", String(40), nullable=False),
    Column("created_at", Float, nullable=False),
)

jobs = Table(
    "jobs",
    metadata,
    Column("id", String(40), primary_key=True),
    Column("kind", String(32), nullable=False),
    Column("name", String(200)),
    Column("config", Text, nullable=False),
    Column("status", String(16), nullable=False),
    Column("created_by", String(40), nullable=False),
    Column("idempotency_key", String(255)),
    Column("request_hash", String(64), nullable=False),
    Column("created_at", Float, nullable=False),
    Column("started_at", Float),
    Column("finished_at", Float),
    Column("error", Text),
    Column("cancel_requested", Boolean, nullable=False),
    Column("attempts", Integer, nullable=False),
    Column("lease_owner", String(200)),
    Column("lease_token", String(64)),
    Column("lease_expires_at", Float),
    Column("stage", String(200)),
    Column("progress_done", Integer),
    Column("progress_total", Integer),
    Column("event_seq", Integer, nullable=False),
    Column("summary", Text),
    UniqueConstraint("created_by", "idempotency_key", name="jobs_idempotency"),
    Index("jobs_claim", "status", "created_at"),
    Index("jobs_listing", "created_at", "id"),
)

events = Table(
    "events",
    metadata,
    Column("job_id", String(40), ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True),
    Column("seq", Integer, primary_key=True),
    Column("created_at", Float, nullable=False),
    Column("kind", String(32), nullable=False),
    Column("data", Text, nullable=False),
)

artifacts = Table(
    "artifacts",
    metadata,
    Column("job_id", String(40), ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True),
    Column("path", String(1000), primary_key=True),
    Column("bytes", BigInteger, nullable=False),
    Column("sha256", String(64), nullable=False),
)

deployments = Table(
    "deployments",
    metadata,
    Column("id", String(100), primary_key=True),
    Column("student", String(40), ForeignKey("jobs.id"), nullable=False),
    Column("threshold", Float, nullable=False),
    Column("target_agreement", Float, nullable=False),
    Column("validation", Text, nullable=False),
    Column("requests", BigInteger, nullable=False),
    Column("escalated", BigInteger, nullable=False),
    Column("escalated_agree", BigInteger, nullable=False),
    Column("created_by", String(40), nullable=False),
    Column("created_at", Float, nullable=False),
)


def _add_service_state(connection: Connection) -> None:
    """1 -> 2: the service_state table; a database where a key was ever created needs keys from now on."""
    service_state.create(connection)
    if connection.execute(select(api_keys.c.id).limit(1)).first() is not None:
        connection.execute(service_state.insert().values(name="keys_required", value="1", set_at=time.time()))


# version n -> n + 1, each run inside the schema lock's transaction
MIGRATIONS: dict[int, Callable[[Connection], None]] = {1: _add_service_state}


def normalize_url(url: str) -> str:
    """`postgresql://` and `postgres://` mean psycopg 3; SQLite URLs pass through; anything else is refused."""
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    if url.startswith(("postgresql+psycopg://", "sqlite://")):
        return url
    raise DistillError(f"database URL must start with postgresql:// or sqlite://, not {url.split(':', 1)[0]}://")


def open_engine(url: str, pool_size: int = 10) -> Engine:
    """An engine for `url`: SQLite in WAL mode with a busy timeout, or PostgreSQL through psycopg 3."""
    url = normalize_url(url)
    if url.startswith("sqlite"):
        engine = create_engine(
            url,
            connect_args={"timeout": BUSY_TIMEOUT_MS / 1000, "check_same_thread": False},
            pool_size=pool_size,
            max_overflow=20,
        )

        @event.listens_for(engine, "connect")
        def _connect(dbapi_connection: Any, _: Any) -> None:
            dbapi_connection.isolation_level = None  # transactions are begun below, not by the driver
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.close()

        @event.listens_for(engine, "begin")
        def _begin(connection: Connection) -> None:
            mode = connection.get_execution_options().get("sqlite_begin", "DEFERRED")
            connection.exec_driver_sql(f"BEGIN {mode}")

        return engine
    return create_engine(url, pool_size=pool_size, max_overflow=20, pool_pre_ping=True, pool_recycle=300)


@contextmanager
def read(engine: Engine) -> Iterator[Connection]:
    """A read transaction."""
    with engine.connect() as connection, connection.begin():
        yield connection


_SQLITE_WRITERS: dict[str, threading.Lock] = {}


@contextmanager
def write(engine: Engine) -> Iterator[Connection]:
    """A write transaction (on SQLite it holds the write lock from its start).

    On SQLite the threads of one process also take turns on a lock of their own first: SQLite's busy handler makes
    a waiting writer sleep in growing steps (up to 100 ms), so many threads contending for the database's lock
    would wait far longer than the writes take; queued on a Python lock they go one after the other at once."""
    if engine.dialect.name != "sqlite":
        with engine.connect() as connection, connection.begin():
            yield connection
        return
    lock = _SQLITE_WRITERS.setdefault(str(engine.url), threading.Lock())
    with lock, engine.connect() as connection:
        connection.execution_options(sqlite_begin="IMMEDIATE")
        with connection.begin():
            yield connection


def ensure_schema(engine: Engine) -> int:
    """Create, upgrade or check the tables; return the schema version. Safe to call from several processes."""
    with write(engine) as connection:
        if engine.dialect.name == "postgresql":
            connection.execute(text("SELECT pg_advisory_xact_lock(7275010)"))
        names = set(inspect(connection).get_table_names())
        if "schema_info" not in names:
            ours = {t.name for t in metadata.sorted_tables} & names
            if ours:
                raise DistillError(
                    f"the database has distill tables ({', '.join(sorted(ours))}) but no schema version; "
                    "it was not created by this service: use an empty database"
                )
            metadata.create_all(connection)
            connection.execute(schema_info.insert().values(version=SCHEMA_VERSION))
            return SCHEMA_VERSION
        version = connection.execute(select(schema_info.c.version)).scalar()
        if version is None:
            raise DistillError("the database's schema_info table is empty; it was not created by this service")
        if version > SCHEMA_VERSION:
            raise DistillError(
                f"the database has schema version {version}, written by a newer distill; this one knows up to "
                f"{SCHEMA_VERSION}: upgrade distill"
            )
        while version < SCHEMA_VERSION:
            MIGRATIONS[version](connection)
            version += 1
            connection.execute(schema_info.update().values(version=version))
        return int(version)


def check_schema(engine: Engine) -> None:
    """Fail with a clear message unless the tables exist at this distill's schema version (without changing it)."""
    with read(engine) as connection:
        if "schema_info" not in set(inspect(connection).get_table_names()):
            raise DistillError("the database has no distill tables yet: start `distill service` once to create them")
        version = connection.execute(select(schema_info.c.version)).scalar()
    if version != SCHEMA_VERSION:
        raise DistillError(
            f"the database has schema version {version} but this distill expects {SCHEMA_VERSION}; "
            "run the same distill version for the service and every worker"
        )
