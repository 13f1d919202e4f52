"""`/v1/jobs/{id}/artifacts` and `/v1/jobs/{id}/report`: what a finished job produced.

The manifest lists every result file (not checkpoints or caches) with its size and sha256, recorded when the job
ended; a file downloads with HTTP Range support (resume a large download with `Range: bytes=N-`), its sha256 in the
`ETag` and `X-Checksum-Sha256` headers. The report is the run's metrics.json and report.md (or report.html).
"""

from __future__ import annotations

import json
import os
import stat
from typing import Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import FileResponse, HTMLResponse, PlainTextResponse
from starlette.responses import Response

from distill.asgi import MAX_JSON_DEPTH, json_too_deep
from distill.service import jobs
from distill.service.auth import Principal
from distill.service.deps import require, services
from distill.service.errors import ServiceError
from distill.service.refs import job_output
from distill.service.settings import Settings

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


def output_text(settings: Settings, job_id: str, name: str) -> str | None:
    """A report file of a job (`report.md`, `metrics.json`...) as text, or None when the job wrote none.

    Only a regular file directly inside the job's output folder is read, opened without following links: a symlink
    (wherever it points) is refused with 404, so nothing outside the folder can be served through one."""
    output = job_output(settings, job_id)
    if not output.resolve().is_relative_to(settings.jobs_dir.resolve()):
        raise ServiceError(404, f"job {job_id}'s output folder is not inside the service's data directory")
    try:
        descriptor = os.open(output / name, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        return None
    except OSError:  # ELOOP: the name is a symlink
        raise ServiceError(404, f"job {job_id}'s {name} is not a regular file", code="not_found") from None
    with os.fdopen(descriptor, "rb") as handle:
        if not stat.S_ISREG(os.fstat(handle.fileno()).st_mode):
            raise ServiceError(404, f"job {job_id}'s {name} is not a regular file", code="not_found")
        data = handle.read()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ServiceError(409, f"job {job_id}'s {name} is not UTF-8 text (byte {error.start})") from None


def output_metrics(settings: Settings, job: dict[str, Any]) -> Any:
    """The job's metrics.json (the stored summary when the file is missing); 409 when it is not readable JSON."""
    text = output_text(settings, job["id"], "metrics.json")
    if text is None:
        return job["metrics"]
    if json_too_deep(text.encode(), MAX_JSON_DEPTH):
        raise ServiceError(409, f"job {job['id']}'s metrics.json nests more than {MAX_JSON_DEPTH} levels deep")
    try:
        return json.loads(text)
    except ValueError as error:
        raise ServiceError(409, f"job {job['id']}'s metrics.json is not valid JSON ({error})") from None


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
    if format == "html":
        page = output_text(svc.settings, job_id, "report.html")
        if page is None:
            raise ServiceError(404, f"job {job_id} ({job['kind']}) wrote no HTML report", code="not_found")
        return HTMLResponse(page)
    markdown = output_text(svc.settings, job_id, "report.md")
    if format == "md":
        if markdown is None:
            raise ServiceError(404, f"job {job_id} ({job['kind']}) wrote no report.md", code="not_found")
        return PlainTextResponse(markdown, media_type="text/markdown")
    return {
        "object": "job.report",
        "job": job_id,
        "kind": job["kind"],
        "metrics": jobs.clean(output_metrics(svc.settings, job)),  # NaN (an empty calibration bin) becomes null
        "report_md": markdown,
    }
