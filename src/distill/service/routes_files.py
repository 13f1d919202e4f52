"""`/v1/files`: upload (multipart, like OpenAI's), list, look up and download uploaded files."""

from __future__ import annotations

import re
from typing import Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import FileResponse
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from distill.service import files
from distill.service.auth import Principal
from distill.service.deps import require, services
from distill.service.errors import ServiceError, not_found
from distill.service.guard import MULTIPART_OVERHEAD

router = APIRouter(prefix="/v1", tags=["files"])
PURPOSE = re.compile(r"^[a-z0-9_-]{1,64}$")


@router.post("/files", status_code=201)
async def upload(request: Request, principal: Principal = Depends(require("write"))) -> dict[str, Any]:
    """Upload a `.jsonl`, `.csv`, `.tsv`, `.txt` or `.npz` file as multipart form data (`file`, `purpose`)."""
    svc = services(request)
    length = request.headers.get("content-length", "")  # without one (chunked), the guard counts the bytes
    if length.isdigit() and int(length) > svc.settings.max_upload_bytes + MULTIPART_OVERHEAD:
        raise ServiceError(
            413, f"the upload is larger than the limit of {svc.settings.max_upload_bytes} bytes", param="file"
        )
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise ServiceError(
            422, "file: send the file as multipart/form-data with the fields file and purpose", param="file"
        )
    form = await request.form(max_files=1, max_fields=8)
    try:
        item = form.get("file")
        purpose = form.get("purpose") or "train"
        if not isinstance(item, UploadFile):
            raise ServiceError(422, "file: the form has no file field", param="file")
        if not isinstance(purpose, str) or not PURPOSE.match(purpose):
            raise ServiceError(422, "purpose: must be 1 to 64 characters of a-z, 0-9, - and _", param="purpose")
        return await run_in_threadpool(
            files.store_upload, svc.settings, svc.engine, item.file, item.filename or "", purpose, principal.key_id
        )
    finally:
        await form.close()


@router.get("/files")
def list_files(
    request: Request, limit: int = Query(100, ge=1, le=1000), _: Principal = Depends(require("read"))
) -> dict[str, Any]:
    return {"object": "list", "data": files.list_files(services(request).engine, limit)}


@router.get("/files/{file_id}")
def get_file(file_id: str, request: Request, _: Principal = Depends(require("read"))) -> dict[str, Any]:
    record = files.get_file(services(request).engine, file_id)
    if record is None:
        raise not_found("file", file_id)
    return files.public(record)


@router.get("/files/{file_id}/content")
def file_content(file_id: str, request: Request, _: Principal = Depends(require("read"))) -> FileResponse:
    svc = services(request)
    record = files.get_file(svc.engine, file_id)
    if record is None:
        raise not_found("file", file_id)
    return FileResponse(
        files.stored_path(svc.settings, record), filename=record["filename"], headers={"ETag": f'"{record["sha256"]}"'}
    )
