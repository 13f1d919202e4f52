"""`/v1/deployments`: cascade deployments of a finished classifier student and its teacher (see `cascade.py`)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request

from distill.service import cascade, jobs
from distill.service.auth import Principal
from distill.service.deps import require, services
from distill.service.errors import ServiceError
from distill.service.schemas import DeploymentCreate

router = APIRouter(prefix="/v1", tags=["deployments"])


@router.post("/deployments", status_code=201)
def create_deployment(
    body: DeploymentCreate, request: Request, principal: Principal = Depends(require("write"))
) -> dict[str, Any]:
    """Choose the student's confidence threshold on validation inputs and serve the cascade under `name`."""
    svc = services(request)
    try:
        job = jobs.get(svc.engine, body.student)
    except ServiceError as error:
        raise ServiceError(422, f"student: {error.message}", param="student") from None
    return cascade.create(
        svc.settings,
        svc.engine,
        job,
        name=body.name,
        target=body.target_agreement,
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
