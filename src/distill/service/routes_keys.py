"""`/v1/keys` (admin scope): create, list and revoke API keys over HTTP; the first key comes from the CLI."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request

from distill.errors import DistillError
from distill.service import auth
from distill.service.deps import require, services
from distill.service.errors import ServiceError, not_found
from distill.service.schemas import KeyCreate

router = APIRouter(prefix="/v1", tags=["keys"])


@router.post("/keys", status_code=201)
def create_key(body: KeyCreate, request: Request, _: auth.Principal = Depends(require("admin"))) -> dict[str, Any]:
    """A new key; the response is the only time its secret is shown."""
    try:
        scopes = auth.parse_scopes(body.scopes)
    except DistillError as error:
        raise ServiceError(422, f"scopes: {error}", param="scopes") from None
    key, record = auth.create_key(services(request).engine, scopes, body.name)
    return {**record, "key": key}


@router.get("/keys")
def list_keys(request: Request, _: auth.Principal = Depends(require("admin"))) -> dict[str, Any]:
    return {"object": "list", "data": auth.list_keys(services(request).engine)}


@router.delete("/keys/{key_id}")
def revoke_key(key_id: str, request: Request, _: auth.Principal = Depends(require("admin"))) -> dict[str, Any]:
    if not auth.revoke_key(services(request).engine, key_id):
        raise not_found("active API key", key_id)
    return {"id": key_id, "object": "api_key", "revoked": True}
