"""The service's request guard: `distill.asgi.RequestGuard` with the service's limits and its `admit` step.

`admit` runs before any byte of a request's body is read:
- every request: in open mode, an `Origin` that is not the service's own is refused (403);
- `/v1/...`: the caller is authenticated (401 without a valid key once keys exist; loopback only in open mode) and
  the principal is kept in the request's state for the routes' scope checks;
- the API docs (`/docs`, `/redoc`, `/openapi.json`): a key with the `read` scope, or a dashboard session, once keys
  exist.
The dashboard's pages check their own session cookie; `/healthz` answers anyone.
"""

from __future__ import annotations

from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.types import Scope

from distill.asgi import Refusal
from distill.service.auth import Principal
from distill.service.deps import _presented_key, authenticate, check_origin, services
from distill.service.errors import ServiceError
from distill.service.settings import Settings
from distill.service.web_session import COOKIE, principal_for_key, sessions

API_DOCS = ("/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json")
UPLOADS = ("/v1/files", "/ui/jobs")  # multipart bodies, passed on as they arrive
MULTIPART_OVERHEAD = 64 * 1024  # the form's own bytes around an upload of the largest allowed size


def _docs_reader(request: Request) -> Principal:
    """A key (or open mode), else the dashboard session's key; it must hold `read`."""
    try:
        found = authenticate(request)
    except ServiceError:
        session = sessions(services(request)).get(request.cookies.get(COOKIE))
        from_session = principal_for_key(request, session.key) if session is not None else None
        if from_session is None:
            raise
        found = from_session
    if not found.allows("read"):
        raise ServiceError(403, "the API docs need the 'read' scope", code="insufficient_scope")
    return found


def _check(request: Request) -> Principal | None:
    check_origin(request)
    path = request.url.path
    if path.startswith("/v1/"):
        return authenticate(request)
    if path in API_DOCS:
        return _docs_reader(request)
    return None


async def admit(scope: Scope) -> Refusal | None:
    """Authenticate before the body is read; the refusal to send, or None to go on."""
    request = Request(scope)
    try:
        if services(request).keys.fresh(_presented_key(request)):  # answered from memory, on the event loop
            found = _check(request)
        else:
            found = await run_in_threadpool(_check, request)  # the key cache reads the database
    except ServiceError as error:
        headers = {"WWW-Authenticate": "Bearer"} if error.status == 401 else {}
        return Refusal(error.status, error.message, error.code, error.param, headers)
    if found is not None:
        scope.setdefault("state", {})["principal"] = found
    return None


def options(settings: Settings) -> dict[str, Any]:
    """The `RequestGuard` options of a service: JSON bodies up to `max_body_bytes`, uploads up to the upload limit."""
    upload = settings.max_upload_bytes + MULTIPART_OVERHEAD
    return {"max_bytes": settings.max_body_bytes, "streamed": dict.fromkeys(UPLOADS, upload), "admit": admit}
