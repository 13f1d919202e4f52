"""The job store: create (idempotently), look up, list, events, cancel, retry, artifacts.

States: `queued` -> `running` -> `succeeded` | `failed` | `cancelled`; `retry` puts a failed or cancelled job back
in the queue (it resumes from its checkpoints). How workers claim and hold jobs is in `leases.py`.

Events are numbered per job (1, 2, ...): the number comes from the job row (`event_seq`), updated in the same
transaction that inserts the event, so event numbers commit in order and a reader resuming after number n misses
nothing.
"""

from __future__ import annotations

import hashlib
import json
import math
import secrets
import time
from typing import Any

from sqlalchemy import Connection, Engine, and_, or_, select
from sqlalchemy.exc import IntegrityError

from distill.service import db
from distill.service.errors import ServiceError, not_found

TERMINAL = ("succeeded", "failed", "cancelled")
STATUSES = ("queued", "running", *TERMINAL)


def clean(value: Any) -> Any:
    """JSON-safe data: NaN and infinities become null, unknown objects their string."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [clean(v) for v in value]
    if value is None or isinstance(value, bool | int | str):
        return value
    return str(value)


def dumps(value: Any) -> str:
    return json.dumps(clean(value), allow_nan=False)


def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


def append_event(connection: Connection, job_id: str, kind: str, data: dict[str, Any]) -> int:
    """Insert the job's next event inside the caller's transaction; return its number."""
    seq = connection.execute(
        db.jobs.update()
        .where(db.jobs.c.id == job_id)
        .values(event_seq=db.jobs.c.event_seq + 1)
        .returning(db.jobs.c.event_seq)
    ).scalar_one()
    connection.execute(
        db.events.insert().values(job_id=job_id, seq=seq, created_at=time.time(), kind=kind[:32], data=dumps(data))
    )
    return int(seq)


def public(row: Any) -> dict[str, Any]:
    """A job as the API shows it."""
    job = dict(row._mapping) if hasattr(row, "_mapping") else dict(row)
    return {
        "id": job["id"],
        "object": "job",
        "kind": job["kind"],
        "name": job["name"],
        "status": job["status"],
        "config": json.loads(job["config"]),
        "created_at": job["created_at"],
        "started_at": job["started_at"],
        "finished_at": job["finished_at"],
        "error": job["error"],
        "cancel_requested": bool(job["cancel_requested"]),
        "attempts": job["attempts"],
        "stage": job["stage"],
        "progress": {"done": job["progress_done"], "total": job["progress_total"]},
        "events": job["event_seq"],
        "metrics": json.loads(job["summary"]) if job["summary"] else None,
    }


def _request_hash(kind: str, config: dict[str, Any], name: str | None) -> str:
    return hashlib.sha256(json.dumps([kind, config, name], sort_keys=True).encode()).hexdigest()


def create(
    engine: Engine,
    kind: str,
    config: dict[str, Any],
    *,
    name: str | None,
    created_by: str,
    idempotency_key: str | None,
) -> tuple[dict[str, Any], bool]:
    """Queue a job; return (job, created). A repeated Idempotency-Key with the same request returns the first job
    (created False); with another request it is a 409."""
    digest = _request_hash(kind, config, name)
    if idempotency_key is not None:
        existing = _by_idempotency(engine, created_by, idempotency_key, digest)
        if existing is not None:
            return existing, False
    job_id = new_id("job")
    try:
        with db.write(engine) as connection:
            connection.execute(
                db.jobs.insert().values(
                    id=job_id,
                    kind=kind,
                    name=name,
                    config=dumps(config),
                    status="queued",
                    created_by=created_by,
                    idempotency_key=idempotency_key,
                    request_hash=digest,
                    created_at=time.time(),
                    cancel_requested=False,
                    attempts=0,
                    event_seq=0,
                )
            )
            append_event(connection, job_id, "status", {"status": "queued"})
            row = connection.execute(select(db.jobs).where(db.jobs.c.id == job_id)).one()
    except IntegrityError:  # the same Idempotency-Key, committed by a concurrent request
        if idempotency_key is None:
            raise
        existing = _by_idempotency(engine, created_by, idempotency_key, digest)
        if existing is None:
            raise
        return existing, False
    return public(row), True


def _by_idempotency(engine: Engine, created_by: str, key: str, digest: str) -> dict[str, Any] | None:
    with db.read(engine) as connection:
        row = connection.execute(
            select(db.jobs).where(db.jobs.c.created_by == created_by, db.jobs.c.idempotency_key == key)
        ).first()
    if row is None:
        return None
    if row.request_hash != digest:
        raise ServiceError(
            409,
            f"Idempotency-Key {key!r} was already used for another request (job {row.id}); use a new key",
            param="Idempotency-Key",
            code="idempotency_key_reused",
        )
    return public(row)


def get(engine: Engine, job_id: str) -> dict[str, Any]:
    with db.read(engine) as connection:
        row = connection.execute(select(db.jobs).where(db.jobs.c.id == job_id)).first()
    if row is None:
        raise not_found("job", job_id)
    return public(row)


def listing(engine: Engine, *, status: str | None, limit: int, after: str | None) -> list[dict[str, Any]]:
    """Jobs, newest first; `after` a job id to continue from (the last one of the previous page)."""
    query = select(db.jobs).order_by(db.jobs.c.created_at.desc(), db.jobs.c.id.desc()).limit(limit)
    if status is not None:
        query = query.where(db.jobs.c.status == status)
    with db.read(engine) as connection:
        if after is not None:
            anchor = connection.execute(select(db.jobs.c.created_at).where(db.jobs.c.id == after)).first()
            if anchor is None:
                raise not_found("job", after)
            query = query.where(
                or_(
                    db.jobs.c.created_at < anchor.created_at,
                    and_(db.jobs.c.created_at == anchor.created_at, db.jobs.c.id < after),
                )
            )
        return [public(row) for row in connection.execute(query).all()]


def events(engine: Engine, job_id: str, after: int = 0, limit: int = 1000) -> tuple[list[dict[str, Any]], str]:
    """The job's events numbered above `after`, oldest first, and the job's status when they were read."""
    with db.read(engine) as connection:
        status = connection.execute(select(db.jobs.c.status).where(db.jobs.c.id == job_id)).scalar()
        if status is None:
            raise not_found("job", job_id)
        rows = connection.execute(
            select(db.events)
            .where(db.events.c.job_id == job_id, db.events.c.seq > after)
            .order_by(db.events.c.seq)
            .limit(limit)
        ).all()
    return [
        {"id": row.seq, "object": "job.event", "created_at": row.created_at, "kind": row.kind, **_data(row.data)}
        for row in rows
    ], status


def _data(text: str) -> dict[str, Any]:
    data = json.loads(text)
    return {"data": data}


def cancel(engine: Engine, job_id: str) -> dict[str, Any]:
    """A queued job is cancelled at once; a running one is asked to stop (its worker stops at the next step)."""
    with db.write(engine) as connection:
        row = connection.execute(select(db.jobs).where(db.jobs.c.id == job_id)).first()
        if row is None:
            raise not_found("job", job_id)
        if row.status in TERMINAL:
            raise ServiceError(409, f"job {job_id} has already {row.status}; there is nothing to cancel")
        if row.status == "queued":
            connection.execute(
                db.jobs.update()
                .where(db.jobs.c.id == job_id)
                .values(status="cancelled", finished_at=time.time(), error="cancelled by request")
            )
            append_event(connection, job_id, "status", {"status": "cancelled", "reason": "cancelled by request"})
        elif not row.cancel_requested:
            connection.execute(db.jobs.update().where(db.jobs.c.id == job_id).values(cancel_requested=True))
            append_event(connection, job_id, "cancel_requested", {})
        row = connection.execute(select(db.jobs).where(db.jobs.c.id == job_id)).one()
    return public(row)


def retry(engine: Engine, job_id: str) -> dict[str, Any]:
    """Queue a failed or cancelled job again; it resumes from the checkpoints its last attempt left."""
    with db.write(engine) as connection:
        row = connection.execute(select(db.jobs).where(db.jobs.c.id == job_id)).first()
        if row is None:
            raise not_found("job", job_id)
        if row.status not in ("failed", "cancelled"):
            raise ServiceError(409, f"job {job_id} is {row.status}; only failed or cancelled jobs can be retried")
        connection.execute(
            db.jobs.update()
            .where(db.jobs.c.id == job_id)
            .values(
                status="queued",
                cancel_requested=False,
                error=None,
                finished_at=None,
                attempts=0,
                lease_owner=None,
                lease_token=None,
                lease_expires_at=None,
            )
        )
        append_event(connection, job_id, "status", {"status": "queued", "reason": "retry"})
        row = connection.execute(select(db.jobs).where(db.jobs.c.id == job_id)).one()
    return public(row)


def artifacts(engine: Engine, job_id: str) -> tuple[str, list[dict[str, Any]]]:
    """The job's status and its artifacts' manifest entries (path, bytes, sha256), sorted by path."""
    with db.read(engine) as connection:
        status = connection.execute(select(db.jobs.c.status).where(db.jobs.c.id == job_id)).scalar()
        if status is None:
            raise not_found("job", job_id)
        rows = connection.execute(
            select(db.artifacts.c.path, db.artifacts.c.bytes, db.artifacts.c.sha256)
            .where(db.artifacts.c.job_id == job_id)
            .order_by(db.artifacts.c.path)
        ).all()
    return status, [{"path": r.path, "bytes": r.bytes, "sha256": r.sha256} for r in rows]
