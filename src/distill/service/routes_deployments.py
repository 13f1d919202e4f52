"""`/v1/deployments`: cascade deployments of a finished student and its teacher (`cascade.py` for classifiers,
`cascade_lm.py` for causal LMs)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request

from distill.service import cascade, cascade_lm, jobs
from distill.service.auth import Principal
from distill.service.deps import require, services
from distill.service.errors import ServiceError
from distill.service.refs import JOB_REF
from distill.service.schemas import DeploymentCreate

router = APIRouter(prefix="/v1", tags=["deployments"])


@router.post("/deployments", status_code=201)
def create_deployment(
    body: DeploymentCreate, request: Request, principal: Principal = Depends(require("write"))
) -> dict[str, Any]:
    """Choose the student's confidence threshold on validation inputs and serve the cascade under `name`: a
    classifier student (`cascade.py`) or a causal LM student (`cascade_lm.py`)."""
    svc = services(request)
    match = JOB_REF.match(body.student)
    if match is None:
        message = f"student: must be a finished job's id (job-...), not {body.student[:60]!r}"
        raise ServiceError(422, message, param="student")
    try:
        job = jobs.get(svc.engine, match[1])
    except ServiceError as error:
        raise ServiceError(422, f"student: {error.message}", param="student") from None
    folder = cascade_lm.student_folder(svc.settings, match[1], match[2])
    if cascade_lm.is_lm(folder):
        assert folder is not None
        cascade.check_deployable(job, body.name)
        return cascade_lm.create(svc.settings, svc.engine, job, folder, body, principal.key_id)
    if match[2] or body.lm_fields():
        field = "student" if match[2] else body.lm_fields()[0]
        message = f"{field}: for LM students only; job {match[1]}'s student is a classifier (give the job id alone)"
        raise ServiceError(422, message, param=field)
    return cascade.create(
        svc.settings,
        svc.engine,
        job,
        name=body.name,
        target=body.target_agreement,
        assurance=body.assurance,
        validation=body.validation,
        size=body.validation_size,
        created_by=principal.key_id,
    )


@router.get("/deployments")
def list_deployments(request: Request, _: Principal = Depends(require("read"))) -> dict[str, Any]:
    return {"object": "list", "data": cascade.listing(services(request).engine)}


@router.get("/deployments/{name}")
def get_deployment(name: str, request: Request, _: Principal = Depends(require("read"))) -> dict[str, Any]:
    """The threshold, its validation figures and the live counts (requests, escalation rate, agreement)."""
    return cascade.get(services(request).engine, name)


@router.delete("/deployments/{name}")
def delete_deployment(name: str, request: Request, _: Principal = Depends(require("write"))) -> dict[str, Any]:
    cascade.delete(services(request).engine, name)
    return {"id": name, "object": "deployment", "deleted": True}
