"""The service's `Reporter`: the library's progress calls become a running job's stored events.

`stage` and `end` and every `event` (an epoch's metrics...) are stored at once; `advance` updates the step count and
stores a `progress` event at most every `progress_seconds`. Writes are fenced by the job's lease; when the store
cannot be reached the events wait and go out with the next write, so a database restart does not stop training.

`cancelled()` is what the training loop asks before every step: it is true when the user cancelled the job, when
the worker is shutting down, or when the lease is lost or may have expired (the worker could not renew it in time);
the loop then checkpoints and raises `Cancelled`. The answer comes from `LeaseState`, which the heartbeat thread
keeps current, so asking costs no database round trip.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError

from distill.service import leases

log = logging.getLogger("distill.worker")
MAX_PENDING = 10_000


@dataclass
class LeaseState:
    """What the heartbeat thread knows about the lease, read by the reporter and the worker."""

    deadline: float  # time.monotonic() after which the lease may have expired
    cancel_requested: bool = False
    lost: bool = False
    stopping: threading.Event = field(default_factory=threading.Event)  # the worker is shutting down

    def expired(self) -> bool:
        return time.monotonic() > self.deadline

    def should_stop(self) -> bool:
        return self.cancel_requested or self.lost or self.stopping.is_set() or self.expired()


class JobReporter:
    """Reports one claimed job's progress into the store."""

    def __init__(
        self, engine: Engine, job_id: str, token: str, state: LeaseState, progress_seconds: float = 1.0
    ) -> None:
        self.engine, self.job_id, self.token, self.state = engine, job_id, token, state
        self.progress_seconds = progress_seconds
        self.name: str | None = None
        self.total: int | None = None
        self.done = 0
        self.metrics: dict[str, float] = {}
        self.pending: list[tuple[str, dict[str, Any]]] = []
        self.last_progress = 0.0
        self.failing = False  # the last write failed (logged once per outage)
        self.lock = threading.Lock()

    def stage(self, name: str, total: int | None = None) -> None:
        self.name, self.total, self.done, self.metrics = name, total, 0, {}
        self._queue("stage", {"name": name, "total": total})
        self.flush()
        self.last_progress = 0.0  # the stage's first advance is stored at once (a resumed stage starts past 0)

    def advance(self, steps: int = 1, **metrics: float) -> None:
        self.done += steps
        self.metrics = {k: float(v) for k, v in metrics.items()}
        if time.monotonic() - self.last_progress >= self.progress_seconds:
            self.last_progress = time.monotonic()
            self._queue("progress", {"stage": self.name, "done": self.done, "total": self.total, **self.metrics})
            self.flush()

    def event(self, kind: str, **data: Any) -> None:
        self._queue(kind, data)
        self.flush()

    def end(self) -> None:
        if self.name is not None:
            self._queue("stage_end", {"name": self.name, "done": self.done, "total": self.total})
            self.flush()

    def cancelled(self) -> bool:
        return self.state.should_stop()

    def _queue(self, kind: str, data: dict[str, Any]) -> None:
        with self.lock:
            if len(self.pending) >= MAX_PENDING:  # the store has been away for long: keep the newest progress
                self.pending = [e for e in self.pending if e[0] != "progress"][-MAX_PENDING // 2 :]
            self.pending.append((kind, data))

    def flush(self) -> bool:
        """Store what is pending (fenced by the lease); False when it could not be stored now."""
        with self.lock:
            batch, self.pending = self.pending, []
        try:
            owned = leases.record(self.engine, self.job_id, self.token, batch, (self.name, self.done, self.total))
        except SQLAlchemyError as error:
            if not self.failing:
                log.warning("job %s: cannot store events now (%s); keeping them", self.job_id, type(error).__name__)
            self.failing = True
            with self.lock:
                self.pending = batch + self.pending
            return False
        if self.failing:
            log.info("job %s: events stored again (%d waited)", self.job_id, len(batch))
            self.failing = False
        if not owned:
            self.state.lost = True
        return owned
