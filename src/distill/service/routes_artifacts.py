"""`/v1/jobs/{id}/artifacts` and `/v1/jobs/{id}/report`: what a finished job produced.

The manifest lists every result file (not checkpoints or caches) with its size and sha256, recorded when the job
ended; a file downloads with HTTP Range support (resume a large download with `Range: bytes=N-`), its sha256 in the
`ETag` and `X-Checksum-Sha256` headers. The report is the run's metrics.json and report.md (or report.html).
"""

from __future__ import annotations

import json
from typing import Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import FileResponse, HTMLResponse, PlainTextResponse
from starlette.responses import Response

from distill.service import jobs
from distill.service.auth import Principal
from distill.service.deps import require, services
from distill.service.errors import ServiceError
from distill.service.refs import job_output

router = APIRouter(prefix="/v1", tags=["artifacts"])


@router.get("/jobs/{job_id}/artifacts")
def list_artifacts(job_id: str, request: Request, _: Principal = Depends(require("read"))) -> dict[str, Any]:
    status, entries = jobs.artifacts(services(request).engine, job_id)
    if status not in jobs.TERMINAL:
        raise ServiceError(409, f"job {job_id} is {status}; its artifacts are listed once it has ended")
    return {
        "object": "list",
        "job": job_id,
        "status": status,
        "data": entries,
        "total_bytes": sum(e["bytes"] for e in entries),
    }


@router.get("/jobs/{job_id}/artifacts/{path:path}")
def download(job_id: str, path: str, request: Request, _: Principal = Depends(require("read"))) -> FileResponse:
    svc = services(request)
    status, entries = jobs.artifacts(svc.engine, job_id)
    entry = next((e for e in entries if e["path"] == path), None)
    if entry is None:
        raise ServiceError(404, f"job {job_id} has no artifact {path!r}", code="not_found")
    output = job_output(svc.settings, job_id).resolve()
    file = (output / entry["path"]).resolve()
    if not file.is_relative_to(output) or not file.is_file():
        raise ServiceError(404, f"artifact {path!r} of job {job_id} is no longer on disk", code="not_found")
    return FileResponse(
        file,
        filename=file.name,
        headers={"ETag": f'"{entry["sha256"]}"', "X-Checksum-Sha256": entry["sha256"]},
    )


@router.get("/jobs/{job_id}/report", response_model=None)
def report(
    job_id: str,
    request: Request,
    format: str = Query("json", pattern="^(json|md|html)$"),
    _: Principal = Depends(require("read")),
) -> dict[str, Any] | Response:
    """The run's metrics and report: JSON (metrics + markdown), `format=md` or `format=html`."""
    svc = services(request)
    job = jobs.get(svc.engine, job_id)
    if job["status"] != "succeeded":
        raise ServiceError(409, f"job {job_id} is {job['status']}; a report exists once it has succeeded")
    output = job_output(svc.settings, job_id)
    markdown = output / "report.md"
    if format == "html":
        page = output / "report.html"
        if not page.is_file():
            raise ServiceError(404, f"job {job_id} ({job['kind']}) wrote no HTML report", code="not_found")
        return HTMLResponse(page.read_text())
    if format == "md":
        if not markdown.is_file():
            raise ServiceError(404, f"job {job_id} ({job['kind']}) wrote no report.md", code="not_found")
        return PlainTextResponse(markdown.read_text(), media_type="text/markdown")
    metrics_file = output / "metrics.json"
    metrics = json.loads(metrics_file.read_text()) if metrics_file.is_file() else job["metrics"]
    return {
        "object": "job.report",
        "job": job_id,
        "kind": job["kind"],
        "metrics": jobs.clean(metrics),  # NaN (an empty calibration bin) becomes null
        "report_md": markdown.read_text() if markdown.is_file() else None,
    }
