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


def _open_mode(svc: Services) -> bool:
    return not svc.settings.require_keys and not svc.keys.any_key()


def authenticate(request: Request) -> Principal:
    """Who is calling. In open mode (no key was ever created, loopback only) a loopback caller needs no key (one it
    sends is ignored); the Host header must name a loopback address too, so a web page cannot reach the service
    through DNS rebinding, and an `Origin` header must be the service's own. Otherwise a valid key is needed (401)."""
    svc = services(request)
    if _open_mode(svc):
        client = request.client.host if request.client is not None else ""
        if not is_loopback(client) or not is_loopback(_host(request.headers.get("host", ""))):
            raise ServiceError(401, "without API keys the service answers loopback requests only", code="open_mode")
        return OPEN_PRINCIPAL
    key = _presented_key(request)
    if key is None:
        raise ServiceError(
            401,
            "an API key is required: send `Authorization: Bearer <key>` (create one with "
            "`distill service keys create --scopes read,write,infer`)",
            code="missing_api_key",
        )
    found = svc.keys.principal(key)
    if found is None:
        raise ServiceError(401, "the API key is not valid (unknown, malformed or revoked)", code="invalid_api_key")
    return found


def check_origin(request: Request) -> None:
    """In open mode, refuse (403) a request sent by a page of another origin: a browser names the page's origin in
    `Origin`, and without keys nothing else would stop a page from posting to the service cross-site."""
    origin = request.headers.get("origin")
    if origin is None or not _open_mode(services(request)):
        return
    own = f"{request.url.scheme}://{request.headers.get('host', '')}".lower()
    if origin.strip().lower() != own:
        raise ServiceError(
            403, f"requests from the origin {origin[:100]!r} are refused: only the service's own pages may call it "
            "without an API key", code="cross_origin",
        )  # fmt: skip


async def principal(request: Request) -> Principal:
    """The caller's principal: the one the request guard established (`admit`), else authenticated now."""
    known = getattr(request.state, "principal", None)
    if isinstance(known, Principal):
        return known
    if services(request).keys.fresh(_presented_key(request)):  # answered from memory, on the event loop
        return authenticate(request)
    return await run_in_threadpool(authenticate, request)  # the key cache reads the database


def require(scope: str) -> Callable[[Request], Awaitable[Principal]]:
    """A dependency: the caller's principal (see `authenticate`), which must hold `scope` (403 without it)."""

    async def dependency(request: Request) -> Principal:
        found = await principal(request)
        if not found.allows(scope):
            raise ServiceError(403, f"this API key lacks the {scope!r} scope", code="insufficient_scope")
        return found

    return dependency
