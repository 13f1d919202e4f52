"""What every route needs: the service's shared objects and the API-key check, as FastAPI dependencies."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request
from sqlalchemy import Engine
from starlette.concurrency import run_in_threadpool

from distill.service.auth import OPEN_PRINCIPAL, KeyCache, Principal
from distill.service.errors import ServiceError
from distill.service.settings import Settings, is_loopback


@dataclass
class Services:
    """Shared by all requests of one service process."""

    settings: Settings
    engine: Engine
    keys: KeyCache
    models: Any = None  # distill.service.inference.LoadedModels, set by the app
    extra: dict[str, Any] = field(default_factory=dict)


def services(request: Request) -> Services:
    return request.app.state.services  # type: ignore[no-any-return]


def _presented_key(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    if header[:7].lower() == "bearer ":
        return header[7:].strip() or None
    return request.headers.get("x-api-key") or None


def _host(value: str) -> str:
    """The host part of a Host header (`127.0.0.1:8000`, `[::1]:8000`, `localhost`)."""
    if value.startswith("["):
        return value[1 : value.find("]")] if "]" in value else value
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


def require(scope: str) -> Callable[[Request], Awaitable[Principal]]:
    """A dependency: the caller's principal, which must hold `scope` (401 without a valid key, 403 without the
    scope). In open mode (no key exists, loopback only) a loopback caller needs no key (one it sends is ignored);
    the Host header must name a loopback address too, so a web page cannot reach the service through DNS
    rebinding."""

    async def dependency(request: Request) -> Principal:
        key = _presented_key(request)
        if services(request).keys.fresh(key):  # the common case: answered from memory, on the event loop
            return _check(request, key)
        return await run_in_threadpool(_check, request, key)  # the key cache reads the database

    def _check(request: Request, key: str | None) -> Principal:
        svc = services(request)
        if not svc.settings.require_keys and not svc.keys.any_key():  # open mode: whatever key is presented
            client = request.client.host if request.client is not None else ""
            if not is_loopback(client) or not is_loopback(_host(request.headers.get("host", ""))):
                raise ServiceError(401, "without API keys the service answers loopback requests only", code="open_mode")
            principal = OPEN_PRINCIPAL
        elif key is None:
            raise ServiceError(
                401,
                "an API key is required: send `Authorization: Bearer <key>` (create one with "
                "`distill service keys create --scopes read,write,infer`)",
                code="missing_api_key",
            )
        else:
            found = svc.keys.principal(key)
            if found is None:
                raise ServiceError(
                    401, "the API key is not valid (unknown, malformed or revoked)", code="invalid_api_key"
                )
            principal = found
        if not principal.allows(scope):
            raise ServiceError(403, f"this API key lacks the {scope!r} scope", code="insufficient_scope")
        return principal

    return dependency
