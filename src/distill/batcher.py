"""The batcher behind `distill serve`: concurrent requests share the forward passes of `distill.engine.Engine`.

`Batcher` collects submitted rows for up to `wait_ms` after the first arrives, up to `max_batch_size` rows (a request
with more rows is split into batches of that size, so no batch outgrows it), and runs them with `Engine.generate` in
a worker thread, so the event loop stays free. Rows that only score their prompt (`max_tokens` 0) are batched with
the rest like any other.
Cancelling a `Batcher.run` call cancels its rows: a job whose rows are all cancelled before its batch starts is
skipped, and in a running batch they end at the next step while the rows batched with them go on.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass

from distill.engine import Engine, Sequence


@dataclass
class _Job:
    rows: list[Sequence]
    done: asyncio.Future[None]


class Batcher:
    """Runs the rows of concurrent requests together, up to `max_batch_size` rows per batch."""

    def __init__(self, engine: Engine, max_batch_size: int = 16, wait_ms: float = 5.0) -> None:
        if max_batch_size < 1 or not 0 <= wait_ms < float("inf"):
            raise ValueError("max_batch_size must be at least 1 and wait_ms a finite number at least 0")
        self.engine, self.max_batch_size, self.wait_ms = engine, max_batch_size, wait_ms
        self._queue: asyncio.Queue[_Job] | None = None
        self._task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def run(self, rows: list[Sequence]) -> None:
        """Generate `rows` (in place), batched with whatever other rows are waiting. Cancelling this call marks the
        rows cancelled: they are skipped, or end at their batch's next step; the other rows of the batch go on."""
        loop = asyncio.get_running_loop()
        if self._queue is None or self._task is None or self._task.done() or self._loop is not loop:
            self._loop, self._queue = loop, asyncio.Queue()
            self._task = loop.create_task(self._work(self._queue))
        jobs = [
            _Job(rows[i : i + self.max_batch_size], loop.create_future())
            for i in range(0, len(rows), self.max_batch_size)
        ]
        for job in jobs:
            self._queue.put_nowait(job)
        try:
            await asyncio.shield(asyncio.gather(*(job.done for job in jobs)))  # a cancelled request does not cancel...
        except asyncio.CancelledError:
            for row in rows:
                row.cancelled = True  # ...the batch it is in, but its own rows stop
            raise

    async def close(self) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _work(self, queue: asyncio.Queue[_Job]) -> None:
        loop, waiting = asyncio.get_running_loop(), None
        while True:
            batch = [waiting or await queue.get()]
            waiting, size = None, len(batch[0].rows)
            deadline = loop.time() + self.wait_ms / 1000
            while size < self.max_batch_size:
                try:
                    job = queue.get_nowait()
                except asyncio.QueueEmpty:
                    left = deadline - loop.time()
                    if left <= 0:
                        break
                    await asyncio.sleep(min(left, 0.001))
                    continue
                if size + len(job.rows) > self.max_batch_size:
                    waiting = job
                    break
                batch.append(job)
                size += len(job.rows)
            batch = [job for job in batch if not _abandoned(job)]
            if not batch:
                continue
            try:
                await asyncio.to_thread(self.engine.generate, [row for job in batch for row in job.rows])
            except Exception as error:
                for job in batch:
                    if not job.done.done():
                        job.done.set_exception(error)
            else:
                for job in batch:
                    if not job.done.done():
                        job.done.set_result(None)


def _abandoned(job: _Job) -> bool:
    """Whether every row of `job` was cancelled before its batch started; such a job is done without running."""
    if not all(row.cancelled for row in job.rows):
        return False
    for row in job.rows:
        row.finish_reason = row.finish_reason or "cancelled"
    if not job.done.done():
        job.done.set_result(None)
    return True
