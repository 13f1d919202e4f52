"""`/v1/jobs`: create (with `Idempotency-Key`), list, look up, cancel and retry jobs."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Header, Query, Request, Response

from distill.service import jobs, kinds
from distill.service.auth import Principal
from distill.service.deps import require, services
from distill.service.errors import ServiceError
from distill.service.refs import Resolver
from distill.service.schemas import JobCreate

router = APIRouter(prefix="/v1", tags=["jobs"])


@router.post("/jobs", status_code=201)
def create_job(
    body: JobCreate,
    request: Request,
    response: Response,
    idempotency_key: str | None = Header(None, max_length=255),
    principal: Principal = Depends(require("write")),
) -> dict[str, Any]:
    """Queue a job. The config is validated now (422 names the bad field); ids in it must exist. The same
    `Idempotency-Key` with the same body returns the first job (200) instead of creating another."""
    svc = services(request)
    kinds.parse(body.kind, body.config, svc.settings, Resolver(svc.settings, svc.engine))
    job, created = jobs.create(
        svc.engine,
        body.kind,
        body.config,
        name=body.name,
        created_by=principal.key_id,
        idempotency_key=idempotency_key,
    )
    if not created:
        response.status_code = 200
    return job


@router.get("/jobs")
def list_jobs(
    request: Request,
    status: str | None = Query(None),
    limit: int = Query(100, ge=1, le=1000),
    after: str | None = Query(None, description="the last job id of the previous page"),
    _: Principal = Depends(require("read")),
) -> dict[str, Any]:
    if status is not None and status not in jobs.STATUSES:
        raise ServiceError(422, f"status: must be one of {', '.join(jobs.STATUSES)}", param="status")
    data = jobs.listing(services(request).engine, status=status, limit=limit, after=after)
    return {"object": "list", "data": data, "has_more": len(data) == limit}


@router.get("/jobs/{job_id}")
def get_job(job_id: str, request: Request, _: Principal = Depends(require("read"))) -> dict[str, Any]:
    return jobs.get(services(request).engine, job_id)


@router.post("/jobs/{job_id}/cancel")
def cancel_job(job_id: str, request: Request, _: Principal = Depends(require("write"))) -> dict[str, Any]:
    """A queued job is cancelled at once; a running job stops at its next training step (cooperative)."""
    return jobs.cancel(services(request).engine, job_id)


@router.post("/jobs/{job_id}/retry")
def retry_job(job_id: str, request: Request, _: Principal = Depends(require("write"))) -> dict[str, Any]:
    """Queue a failed or cancelled job again; it continues from its checkpoints."""
    return jobs.retry(services(request).engine, job_id)
