"""`/v1/jobs/{id}/events`: a job's events, polled (`after=`) or streamed as server-sent events.

The stream sends each event as `id: <number>`, `event: <kind>`, `data: <the event as JSON>`; a client that
reconnects with `Last-Event-ID: n` (or `?after=n`) gets the events after n and nothing twice. When the job has ended
and every event was sent, a last `event: end` carries its final status and the stream closes.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Depends, Header, Query, Request
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from distill.service import jobs
from distill.service.auth import Principal
from distill.service.deps import Services, require, services
from distill.service.errors import ServiceError

router = APIRouter(prefix="/v1", tags=["events"])
POLL_SECONDS = 0.25
KEEPALIVE_SECONDS = 15.0


MAX_EVENT = 2**63 - 1  # event numbers are 64-bit integers in the store


def _after(after: int | None, last_event_id: str | None) -> int:
    """Where the events resume: `after=` or the `Last-Event-ID` header (ASCII digits, at most 2^63 - 1)."""
    if last_event_id is not None:
        value = last_event_id.strip()
        if not (value.isascii() and value.isdigit() and len(value) <= 19 and int(value) <= MAX_EVENT):
            raise ServiceError(
                422, f"Last-Event-ID: must be an event number from 0 to {MAX_EVENT}", param="Last-Event-ID"
            )
        return max(int(value), after or 0)
    return after or 0


async def _stream(svc: Services, job_id: str, after: int, request: Request) -> AsyncIterator[str]:
    last, quiet_since = after, time.monotonic()
    yield "retry: 1000\n\n"
    while not await request.is_disconnected():
        batch, status = await run_in_threadpool(jobs.events, svc.engine, job_id, last, 500)
        for event in batch:
            yield f"id: {event['id']}\nevent: {event['kind']}\ndata: {json.dumps(event)}\n\n"
            last = event["id"]
        if batch:
            quiet_since = time.monotonic()
            continue
        if status in jobs.TERMINAL:  # the final status event is committed with the status: all were sent
            yield f"event: end\ndata: {json.dumps({'id': job_id, 'status': status, 'last_event_id': last})}\n\n"
            return
        if time.monotonic() - quiet_since > KEEPALIVE_SECONDS:
            yield ": keep-alive\n\n"
            quiet_since = time.monotonic()
        await asyncio.sleep(POLL_SECONDS)


@router.get("/jobs/{job_id}/events", response_model=None)
def job_events(
    job_id: str,
    request: Request,
    after: int | None = Query(None, ge=0, le=MAX_EVENT, description="only events numbered above this"),
    limit: int = Query(1000, ge=1, le=10_000),
    stream: bool = Query(False, description="server-sent events (also chosen by Accept: text/event-stream)"),
    last_event_id: str | None = Header(None),
    _: Principal = Depends(require("read")),
) -> dict[str, Any] | StreamingResponse:
    svc = services(request)
    start = _after(after, last_event_id)
    if stream or "text/event-stream" in request.headers.get("accept", ""):
        jobs.get(svc.engine, job_id)  # 404 before the stream starts
        return StreamingResponse(
            _stream(svc, job_id, start, request),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
    data, status = jobs.events(svc.engine, job_id, start, limit)
    return {"object": "list", "job": job_id, "status": status, "data": data, "has_more": len(data) == limit}
