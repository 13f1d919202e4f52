"""`distill worker`: claim jobs from the store and run them, as many worker processes as wanted.

For each claimed job the worker:
1. takes an exclusive `flock` on the job's folder (`<data_dir>/jobs/<id>/.lock`): if the worker that held the job
   before is still alive (it lost its lease but has not yet noticed), the new one waits for it to stop, so two
   processes never write one job's folder at once; the kernel drops the lock of a killed process;
2. renews its lease from a heartbeat thread; the thread also learns about cancel requests;
3. parses the stored config (resolving file and job ids again) and calls the library with `resume=True` when the
   folder already holds an earlier attempt's work, so a job whose worker died continues from its last checkpoint;
4. records the outcome, fenced by its lease: `succeeded` with the metrics and the artifacts' manifest (path, size,
   sha256 of every output file but checkpoints and caches), `failed` with the reason, or `cancelled`. A worker told to
   stop (SIGTERM) puts its job back in the queue at the next step; one that lost its lease just lets go.
"""

from __future__ import annotations

import fcntl
import logging
import os
import socket
import threading
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError

from distill.data import sha256_file
from distill.errors import DistillError
from distill.progress import Cancelled
from distill.service import kinds, leases
from distill.service.errors import ServiceError
from distill.service.refs import Resolver, job_output
from distill.service.reporter import JobReporter, LeaseState
from distill.service.settings import Settings
from distill.stages import RunContext

log = logging.getLogger("distill.worker")
INTERNAL = ("checkpoints", "cache")  # output folders that are a run's working state, not its results


def manifest(output: Path) -> list[dict[str, Any]]:
    """Every result file under `output` (not checkpoints or caches): relative path, size and sha256."""
    entries = []
    for path in sorted(output.rglob("*")):
        relative = path.relative_to(output)
        if path.is_file() and not path.is_symlink() and relative.parts[0] not in INTERNAL:
            entries.append({"path": relative.as_posix(), "bytes": path.stat().st_size, "sha256": sha256_file(path)})
    return entries


def without_history(metrics: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in metrics.items() if k != "history"}


class Worker:
    """Claims and runs jobs until told to stop."""

    def __init__(self, settings: Settings, engine: Engine, name: str | None = None) -> None:
        self.settings, self.engine = settings, engine
        self.name = name or f"{socket.gethostname()}-{os.getpid()}"
        self.stopping = threading.Event()

    def run(self, *, once: bool = False, max_jobs: int | None = None) -> int:
        """Work until `stop()` (or, with `once`, until the queue is empty); return the number of jobs run."""
        done = 0
        while not self.stopping.is_set() and (max_jobs is None or done < max_jobs):
            try:
                claim = leases.claim(self.engine, self.name, self.settings.lease_seconds, self.settings.max_attempts)
            except SQLAlchemyError as error:
                log.warning("cannot reach the store (%s); retrying", str(error).splitlines()[0])
                self.stopping.wait(self.settings.poll_seconds)
                continue
            if claim is None:
                if once:
                    break
                self.stopping.wait(self.settings.poll_seconds)
                continue
            self.execute(claim)
            done += 1
        return done

    def stop(self) -> None:
        self.stopping.set()

    def execute(self, claim: leases.Claim) -> None:
        """Run one claimed job to its end (or until its lease is lost or the worker stops)."""
        settings = self.settings
        margin = min(settings.heartbeat, settings.lease_seconds / 4)
        state = LeaseState(deadline=time.monotonic() + settings.lease_seconds - margin, stopping=self.stopping)
        state.cancel_requested = claim.cancel_requested
        beating = threading.Event()
        heart = threading.Thread(target=self._heartbeat, args=(claim, state, beating, margin), daemon=True)
        heart.start()
        log.info("job %s (%s): attempt %d on %s", claim.job_id, claim.kind, claim.attempt, self.name)
        try:
            with self._folder_lock(claim, state) as locked:
                if locked:
                    self._run(claim, state)
        finally:
            beating.set()
            heart.join()

    @contextmanager
    def _folder_lock(self, claim: leases.Claim, state: LeaseState) -> Iterator[bool]:
        folder = self.settings.jobs_dir / claim.job_id
        folder.mkdir(parents=True, exist_ok=True)
        with (folder / ".lock").open("a") as handle:
            waited = time.monotonic()
            while True:
                try:
                    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if state.lost or self.stopping.is_set():
                        yield False
                        return
                    if time.monotonic() - waited > max(60.0, 4 * self.settings.lease_seconds):
                        reason = "the job's folder stays locked by another process (a worker that does not stop)"
                        self._finish(claim, state, "failed", error=reason)
                        yield False
                        return
                    time.sleep(0.2)
            try:
                yield True
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def _heartbeat(self, claim: leases.Claim, state: LeaseState, done: threading.Event, margin: float) -> None:
        while not done.wait(self.settings.heartbeat):
            started = time.monotonic()
            try:
                cancel = leases.heartbeat(self.engine, claim.job_id, claim.token, self.settings.lease_seconds)
            except SQLAlchemyError as error:
                log.warning("job %s: heartbeat failed (%s)", claim.job_id, str(error).splitlines()[0])
                continue
            if cancel is None:
                log.warning("job %s: the lease was lost; stopping", claim.job_id)
                state.lost = True
                return
            state.cancel_requested = state.cancel_requested or cancel
            state.deadline = started + self.settings.lease_seconds - margin

    def _run(self, claim: leases.Claim, state: LeaseState) -> None:
        settings = self.settings
        reporter = JobReporter(self.engine, claim.job_id, claim.token, state, settings.progress_seconds)
        output = job_output(settings, claim.job_id)
        try:
            config = kinds.parse(claim.kind, claim.config, settings, Resolver(settings, self.engine))
            resume = output.is_dir() and any(output.iterdir())
            if resume:
                reporter.event("resumed", attempt=claim.attempt, message="continuing from the last checkpoints")
            output.mkdir(parents=True, exist_ok=True)
            context = RunContext(output, resume, reporter, settings.store_dir, settings.datasets_dir)
            metrics = kinds.run(claim.kind, config, context, settings)
        except Cancelled:
            reporter.flush()
            if state.lost:
                log.warning("job %s: stopped after losing its lease", claim.job_id)
            elif state.cancel_requested:
                self._finish(claim, state, "cancelled", error="cancelled by request", output=output)
            elif self.stopping.is_set():
                self._release(claim, "the worker stopped; another worker resumes the job")
            else:
                log.warning("job %s: the lease could not be renewed in time; letting go", claim.job_id)
            return
        except (ServiceError, DistillError) as error:
            reporter.flush()
            message = error.message if isinstance(error, ServiceError) else str(error)
            self._finish(claim, state, "failed", error=settings.redact(message), output=output)
            return
        except Exception as error:  # a bug: keep the traceback in the worker's log, the reason in the job
            log.error("job %s failed:\n%s", claim.job_id, traceback.format_exc())
            reporter.flush()
            reason = f"internal error: {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
            self._finish(claim, state, "failed", error=settings.redact(reason), output=output)
            return
        reporter.flush()
        self._finish(claim, state, "succeeded", summary=without_history(metrics), output=output)

    def _finish(
        self,
        claim: leases.Claim,
        state: LeaseState,
        status: str,
        *,
        error: str | None = None,
        summary: dict[str, Any] | None = None,
        output: Path | None = None,
    ) -> None:
        files = manifest(output) if output is not None and output.is_dir() else []
        while True:  # the store may be restarting: retry until the lease would have run out
            try:
                owned = leases.finish(
                    self.engine, claim.job_id, claim.token, status, error=error, summary=summary, files=files
                )
            except SQLAlchemyError as failure:
                if state.lost or state.expired():
                    log.error("job %s: could not record %s before the lease ran out", claim.job_id, status)
                    return
                log.warning("job %s: cannot record %s yet (%s)", claim.job_id, status, str(failure).splitlines()[0])
                time.sleep(min(1.0, self.settings.heartbeat))
                continue
            if not owned:
                log.warning("job %s: the lease was lost before %s could be recorded", claim.job_id, status)
            else:
                log.info("job %s: %s%s", claim.job_id, status, f" ({error})" if error else "")
            return

    def _release(self, claim: leases.Claim, reason: str) -> None:
        try:
            leases.release(self.engine, claim.job_id, claim.token, reason)
            log.info("job %s: given back to the queue", claim.job_id)
        except SQLAlchemyError:
            log.warning("job %s: could not give the job back; its lease will expire", claim.job_id)
