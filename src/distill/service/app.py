"""The service's FastAPI application: every router under `/v1`, the error format, and `run` (uvicorn).

Errors have one shape, OpenAI's: `{"error": {"message", "type", "param", "code"}}`. A bad payload is 422 with the
field in `param` (e.g. `config.train.lr`), an unknown id 404, a state conflict (cancelling a finished job, retrying a
running one, a reused Idempotency-Key) 409, a missing or invalid key 401, a missing scope 403, a body over the
limit 413 (counted as it arrives, decided before the key for nothing), JSON nested too deep 400, and a store that
cannot be reached 503 with Retry-After. Every request passes `service.guard` first: authentication, the Origin check
of open mode and the body limits come before any route reads a byte.
"""

from __future__ import annotations

import gc
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from sqlalchemy import Engine
from sqlalchemy.exc import DBAPIError

from distill.asgi import RequestGuard, error_body, install_error_handlers
from distill.errors import DistillError
from distill.service import (
    auth,
    db,
    guard,
    routes_artifacts,
    routes_deployments,
    routes_events,
    routes_files,
    routes_jobs,
    routes_keys,
    web,
)
from distill.service.deps import Services
from distill.service.errors import ServiceError
from distill.service.inference import LoadedModels
from distill.service.inference import router as inference_router
from distill.service.settings import Settings, is_loopback


def _service_error(_: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, ServiceError)
    headers = {"WWW-Authenticate": "Bearer"} if error.status == 401 else None
    return JSONResponse(
        error_body(error.status, error.message, error.param, error.code), status_code=error.status, headers=headers
    )


def _store_error(_: Request, error: Exception) -> JSONResponse:
    message = "the database cannot be reached right now; retry shortly"
    return JSONResponse(
        error_body(503, message, None, "store_unavailable"), status_code=503, headers={"Retry-After": "1"}
    )


def _distill_error(_: Request, error: Exception) -> JSONResponse:
    return JSONResponse(error_body(422, str(error), None, "invalid_value"), status_code=422)


def create_app(settings: Settings, engine: Engine | None = None) -> FastAPI:
    """The application over the store at `settings.url` (tables created or checked on the way)."""
    settings.prepare()
    engine = engine or db.open_engine(settings.url, pool_size=20)
    db.ensure_schema(engine)
    svc = Services(settings, engine, auth.KeyCache(engine))
    svc.models = LoadedModels(settings, engine)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        from anyio import to_thread

        to_thread.current_default_thread_limiter().total_tokens = 64  # sync routes run in this many threads
        gc.collect()
        gc.freeze()  # the start-up objects (torch's among them) are never scanned again: shorter collector pauses
        yield
        engine.dispose()

    app = FastAPI(title="distill service", version="1", lifespan=lifespan)
    app.state.services = svc
    install_error_handlers(app)
    app.add_exception_handler(ServiceError, _service_error)
    app.add_exception_handler(DBAPIError, _store_error)
    app.add_exception_handler(DistillError, _distill_error)
    app.add_middleware(RequestGuard, **guard.options(settings))
    for module in (routes_files, routes_jobs, routes_events, routes_artifacts, routes_deployments, routes_keys):
        app.include_router(module.router)
    app.include_router(inference_router)
    web.mount(app)  # the dashboard under /ui

    @app.get("/healthz")
    def health() -> dict[str, Any]:
        return {"status": "ok", "database": engine.dialect.name, "schema_version": db.SCHEMA_VERSION}

    return app


def check_bind(host: str, engine: Engine) -> None:
    """Refuse to listen beyond loopback while no API key exists."""
    if not is_loopback(host) and auth.active_keys(engine) == 0:
        raise DistillError(
            f"refusing to listen on {host}: no API key exists yet, so anyone who reaches it could use the service. "
            "Create one first (`distill service keys create --scopes admin`) or listen on 127.0.0.1"
        )


def run(settings: Settings, host: str = "127.0.0.1", port: int = 8000, *, access_log: bool = False) -> None:
    """Serve until interrupted. Beyond loopback every request needs a key (and one must exist to start)."""
    import dataclasses

    import uvicorn

    settings = dataclasses.replace(settings, require_keys=settings.require_keys or not is_loopback(host)).prepare()
    engine = db.open_engine(settings.url, pool_size=20)
    db.ensure_schema(engine)
    check_bind(host, engine)
    uvicorn.run(create_app(settings, engine), host=host, port=port, access_log=access_log, log_level="info")
