"""Leases: how workers take jobs, keep them, report on them and give them back.

A running job belongs to the worker holding its lease: a random `lease_token` and an expiry time the worker pushes
forward with heartbeats. Every write a worker makes about its job (events, progress, the final state) is fenced by
the token, so a worker that lost its lease cannot touch the job any more.

Claiming is atomic on both databases: the worker selects the oldest claimable job (`queued`, or `running` with an
expired lease) with `FOR UPDATE SKIP LOCKED` on PostgreSQL, so concurrent workers pass over each other's rows, and
inside a `BEGIN IMMEDIATE` transaction on SQLite, which holds the database's only write lock; the UPDATE that takes
the job repeats the claimable condition, so it changes nothing if another worker got there first. A job whose
lease expired `max_attempts` times fails with that reason instead of being claimed again.
"""

from __future__ import annotations

import json
import secrets
import time
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, Engine, and_, delete, or_, select

from distill.service import db
from distill.service.jobs import append_event, dumps


@dataclass(frozen=True)
class Claim:
    job_id: str
    kind: str
    config: dict[str, Any]
    token: str
    attempt: int
    cancel_requested: bool


def _claimable(now: float) -> Any:
    return or_(db.jobs.c.status == "queued", and_(db.jobs.c.status == "running", db.jobs.c.lease_expires_at < now))


def claim(engine: Engine, worker: str, lease_seconds: float, max_attempts: int) -> Claim | None:
    """Take the oldest claimable job for `worker`, or None when there is none."""
    with db.read(engine) as connection:  # the common idle case costs a read, not the write lock
        if connection.execute(select(db.jobs.c.id).where(_claimable(time.time())).limit(1)).first() is None:
            return None
    for _ in range(8):  # jobs that exhausted their attempts are failed on the way
        with db.write(engine) as connection:
            now = time.time()
            row = connection.execute(
                select(db.jobs)
                .where(_claimable(now))
                .order_by(db.jobs.c.created_at, db.jobs.c.id)
                .limit(1)
                .with_for_update(skip_locked=True)
            ).first()
            if row is None:
                return None
            if row.cancel_requested:  # asked to stop while its worker was gone or giving it back: never restart it
                _end(connection, row.id, "cancelled", "cancelled by request", None)
                continue
            expired = row.status == "running"
            if expired:
                append_event(connection, row.id, "lease_expired", {"worker": row.lease_owner, "attempt": row.attempts})
                if row.attempts >= max_attempts:
                    reason = (
                        f"the job's worker stopped responding {row.attempts} times (its lease expired; last worker "
                        f"{row.lease_owner}); retry it to try again"
                    )
                    _end(connection, row.id, "failed", reason, None)
                    continue
            token = secrets.token_hex(16)
            taken = connection.execute(
                db.jobs.update()
                .where(db.jobs.c.id == row.id, _claimable(now))
                .values(
                    status="running",
                    lease_owner=worker,
                    lease_token=token,
                    lease_expires_at=now + lease_seconds,
                    attempts=db.jobs.c.attempts + 1,
                    started_at=row.started_at or now,
                )
            )
            if taken.rowcount != 1:
                continue
            attempt = row.attempts + 1
            append_event(connection, row.id, "status", {"status": "running", "worker": worker, "attempt": attempt})
            return Claim(row.id, row.kind, json.loads(row.config), token, attempt, bool(row.cancel_requested))
    return None


def _owned(job_id: str, token: str) -> Any:
    return and_(db.jobs.c.id == job_id, db.jobs.c.lease_token == token, db.jobs.c.status == "running")


def heartbeat(engine: Engine, job_id: str, token: str, lease_seconds: float) -> bool | None:
    """Extend the lease; return whether a cancel was requested, or None when the lease is no longer ours."""
    with db.write(engine) as connection:
        row = connection.execute(
            db.jobs.update()
            .where(_owned(job_id, token))
            .values(lease_expires_at=time.time() + lease_seconds)
            .returning(db.jobs.c.cancel_requested)
        ).first()
    return None if row is None else bool(row.cancel_requested)


def record(
    engine: Engine,
    job_id: str,
    token: str,
    new_events: list[tuple[str, dict[str, Any]]],
    progress: tuple[str | None, int | None, int | None] | None,
) -> bool:
    """Store a running job's events and its current stage and progress; False when the lease is lost."""
    with db.write(engine) as connection:
        values: dict[str, Any] = {}
        if progress is not None:
            values = {"stage": progress[0], "progress_done": progress[1], "progress_total": progress[2]}
        owned = connection.execute(db.jobs.update().where(_owned(job_id, token)).values(**values)).rowcount
        if owned != 1:
            return False
        for kind, data in new_events:
            append_event(connection, job_id, kind, data)
    return True


def _end(connection: Connection, job_id: str, status: str, error: str | None, summary: dict[str, Any] | None) -> None:
    connection.execute(
        db.jobs.update()
        .where(db.jobs.c.id == job_id)
        .values(
            status=status,
            finished_at=time.time(),
            error=error,
            summary=dumps(summary) if summary is not None else None,
            lease_owner=None,
            lease_token=None,
            lease_expires_at=None,
        )
    )
    append_event(connection, job_id, "status", {"status": status, **({"reason": error} if error else {})})


def finish(
    engine: Engine,
    job_id: str,
    token: str,
    status: str,
    *,
    error: str | None = None,
    summary: dict[str, Any] | None = None,
    files: list[dict[str, Any]] | None = None,
) -> bool:
    """Record the end of a job and its artifacts (fenced by the lease); False when the lease was lost."""
    with db.write(engine) as connection:
        owned = connection.execute(select(db.jobs.c.id).where(_owned(job_id, token))).first()
        if owned is None:
            return False
        connection.execute(delete(db.artifacts).where(db.artifacts.c.job_id == job_id))
        if files:
            connection.execute(db.artifacts.insert(), [{"job_id": job_id, **f} for f in files])
        _end(connection, job_id, status, error, summary)
    return True


def release(engine: Engine, job_id: str, token: str, reason: str) -> bool:
    """Give a running job back to the queue (its worker is stopping); another worker resumes it."""
    with db.write(engine) as connection:
        released = connection.execute(
            db.jobs.update()
            .where(_owned(job_id, token))
            .values(status="queued", lease_owner=None, lease_token=None, lease_expires_at=None)
        ).rowcount
        if released == 1:
            append_event(connection, job_id, "status", {"status": "queued", "reason": reason})
    return released == 1
