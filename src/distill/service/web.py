"""The dashboard: server-rendered pages under `/ui` over the same store as the REST API.

| page                              | what it shows or does                                                     |
| --------------------------------- | ------------------------------------------------------------------------- |
| `/ui/login`                       | API key -> session cookie (see `web_session.py`); everything else needs it  |
| `/ui/`                            | the jobs, their status and key figures; pick several to compare            |
| `/ui/jobs/new`                    | start a recipe, or any job kind from a config and an uploaded file         |
| `/ui/jobs/{id}`                   | live progress (`static/job.js` reads `/ui/jobs/{id}/events`), learning     |
|                                   | curves and loss terms, the report with its plots, artifact downloads      |
| `/ui/compare?job=..&job=..`       | several runs on one accuracy-versus-size chart                            |
| `/ui/keys`                        | API keys (admin scope): create, revoke                                    |

Plots come from `distill.plots` and the report from `distill.report`, as in the HTML report the CLI writes. Every
string is escaped by Jinja's autoescape; every POST carries the session's CSRF token.
"""

from __future__ import annotations

import base64
import json
import secrets
from pathlib import Path
from typing import Any

from fastapi import APIRouter, FastAPI, Form, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from markupsafe import Markup, escape
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from distill import plots, report
from distill.asgi import MAX_JSON_DEPTH, json_too_deep
from distill.errors import DistillError
from distill.recipes import RECIPES
from distill.service import auth, files, jobs, kinds, routes_artifacts, routes_events
from distill.service.deps import services
from distill.service.errors import ServiceError
from distill.service.guard import MULTIPART_OVERHEAD
from distill.service.refs import Resolver
from distill.service.web_session import (
    COOKIE,
    LOGIN_COOKIE,
    TTL_SECONDS,
    Forbidden,
    LoginRequired,
    check_csrf,
    current,
    open_mode_allowed,
    principal_for_key,
    sessions,
    set_cookie,
)

HERE = Path(__file__).parent
templates = Jinja2Templates(directory=HERE / "templates")  # autoescape is on for .html
router = APIRouter(prefix="/ui", include_in_schema=False)
FILE_PLACEHOLDER = "$FILE"


def _bold(text: str) -> Markup:
    """Escape, then render the **bold** spans report summaries use."""
    pieces = str(escape(text)).split("**")
    return Markup("".join(f"<strong>{p}</strong>" if i % 2 else p for i, p in enumerate(pieces)))


def _png(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


templates.env.filters["bold"] = _bold
templates.env.filters["pct"] = report.pct
templates.env.filters["ratio"] = report.ratio


def _page(request: Request, template: str, code: int = 200, **context: Any) -> HTMLResponse:
    return templates.TemplateResponse(request, template, context, status_code=code)


# ----------------------------------------------------------------------------------------------------------------
# Login
# ----------------------------------------------------------------------------------------------------------------


def _safe_next(value: str | None) -> str:
    return value if value and value.startswith("/ui/") and not value.startswith("//") else "/ui/"


@router.get("/login")
def login_page(request: Request, next: str | None = Query(None)) -> HTMLResponse:
    token = secrets.token_urlsafe(32)
    response = _page(
        request, "login.html", csrf=token, next=_safe_next(next), open_mode=open_mode_allowed(request), error=None
    )
    set_cookie(request, response, LOGIN_COOKIE, token, max_age=3600)
    return response


@router.post("/login", response_model=None)
def login(
    request: Request, key: str = Form(""), csrf: str = Form(""), next: str = Form("/ui/")
) -> HTMLResponse | RedirectResponse:
    check_csrf(request.cookies.get(LOGIN_COOKIE, ""), csrf)
    key = key.strip()
    if principal_for_key(request, key or None) is None:
        token = secrets.token_urlsafe(32)
        message = "that API key is not valid (unknown, malformed or revoked)" if key else "an API key is required"
        response = _page(request, "login.html", 401, csrf=token, next=_safe_next(next), open_mode=False, error=message)
        set_cookie(request, response, LOGIN_COOKIE, token, max_age=3600)
        return response
    redirect = RedirectResponse(_safe_next(next), status_code=303)
    set_cookie(request, redirect, COOKIE, sessions(services(request)).create(key or None), max_age=int(TTL_SECONDS))
    redirect.delete_cookie(LOGIN_COOKIE, path="/")
    return redirect


@router.post("/logout")
def logout(request: Request, csrf: str = Form("")) -> RedirectResponse:
    _, session = current(request, "read")
    check_csrf(session.csrf, csrf)
    sessions(services(request)).drop(request.cookies.get(COOKIE))
    redirect = RedirectResponse("/ui/login", status_code=303)
    redirect.delete_cookie(COOKIE, path="/")
    return redirect


# ----------------------------------------------------------------------------------------------------------------
# Jobs
# ----------------------------------------------------------------------------------------------------------------


def _figures(job: dict[str, Any]) -> dict[str, Any]:
    """The key figures of a finished classification job (empty for other kinds)."""
    metrics = job.get("metrics") or {}
    student = metrics.get("student_distilled")
    if not isinstance(student, dict) or "teacher" not in metrics:
        return {}
    return {
        "teacher": metrics["teacher"].get("accuracy"),
        "student": student.get("accuracy"),
        "alone": (metrics.get("student_alone") or {}).get("accuracy"),
        "retention": metrics.get("retention"),
        "compression": metrics.get("compression"),
        "speedup": metrics.get("speedup"),
        "params": student.get("params"),
    }


@router.get("/")
def job_list(request: Request, status: str | None = Query(None)) -> HTMLResponse:
    principal, session = current(request, "read")
    chosen = status if status in jobs.STATUSES else None
    rows = jobs.listing(services(request).engine, status=chosen, limit=200, after=None)
    listed = [{**job, "figures": _figures(job)} for job in rows]
    return _page(
        request, "jobs.html", jobs=listed, status=chosen, statuses=jobs.STATUSES, session=session, who=principal
    )


def _history(engine: Any, job: dict[str, Any]) -> dict[str, list[dict[str, float]]]:
    """Per run, its epoch records: from the metrics when the job has them, else from the `epoch` events so far."""
    stored = (job.get("metrics") or {}).get("history")
    if isinstance(stored, dict) and stored:
        return stored
    history: dict[str, list[dict[str, float]]] = {}
    after = 0
    while True:
        batch, _ = jobs.events(engine, job["id"], after, 5000)
        for event in batch:
            if event["kind"] == "epoch":
                data = dict(event["data"])
                history.setdefault(str(data.pop("run", "run")), []).append(data)
        if len(batch) < 5000:
            return history
        after = batch[-1]["id"]


def _report(svc: Any, job: dict[str, Any]) -> report.Report | None:
    """The finished job's report, built by `distill.report` from its metrics (remembered: they no longer change)."""
    if job["status"] != "succeeded" or not _figures(job):
        return None
    cache: dict[str, report.Report] = svc.extra.setdefault("reports", {})
    if job["id"] not in cache:
        metrics = routes_artifacts.output_metrics(svc.settings, job)
        if len(cache) > 256:
            cache.clear()
        cache[job["id"]] = report.classification_report(metrics)
    return cache[job["id"]]


@router.get("/jobs/new")
def new_job(request: Request) -> HTMLResponse:
    principal, session = current(request, "write")
    return _form(request, session, principal, {})


def _form(request: Request, session: Any, principal: Any, values: dict[str, Any], error: str | None = None) -> Any:
    uploaded = files.list_files(services(request).engine, 50)
    return _page(
        request,
        "new.html",
        422 if error else 200,
        session=session,
        who=principal,
        recipes=list(RECIPES),
        kinds=list(kinds.KINDS),
        uploaded=uploaded,
        values=values,
        error=error,
        placeholder=FILE_PLACEHOLDER,
    )


@router.post("/jobs", response_model=None)
async def create_job(request: Request) -> Response:
    """The new-job form (multipart): kind, recipe, name, config (JSON), and optionally a file whose id replaces
    every `$FILE` in the config."""
    principal, session = await run_in_threadpool(current, request, "write")
    svc = services(request)
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > svc.settings.max_upload_bytes + MULTIPART_OVERHEAD:
        return _form(request, session, principal, {}, f"the upload is over {svc.settings.max_upload_bytes} bytes")
    form = await request.form(max_files=1, max_fields=16)
    try:
        fields = {k: v for k, v in form.items() if isinstance(v, str)}
        check_csrf(session.csrf, fields.get("csrf"))
        item = form.get("file")
        upload = item if isinstance(item, UploadFile) and item.filename else None
        return await run_in_threadpool(_create, request, principal, session, fields, upload)
    finally:
        await form.close()


def _create(request: Request, principal: Any, session: Any, fields: dict[str, str], upload: UploadFile | None) -> Any:
    svc = services(request)
    kind = fields.get("kind", "recipe")
    name = fields.get("name", "").strip()[:200] or None
    try:
        text = fields.get("config", "").strip() or "{}"
        if json_too_deep(text.encode(), MAX_JSON_DEPTH):
            raise DistillError(f"config: nests arrays and objects more than {MAX_JSON_DEPTH} deep")
        config = json.loads(text)
        if not isinstance(config, dict):
            raise DistillError("config: must be a JSON object")
        if kind == "recipe":
            config.setdefault("recipe", fields.get("recipe") or "mnist1d")
        if upload is not None:
            purpose = fields.get("purpose") or "train"
            record = files.store_upload(
                svc.settings, svc.engine, upload.file, upload.filename or "", purpose, principal.key_id
            )
            config = json.loads(json.dumps(config).replace(FILE_PLACEHOLDER, record["id"]))
        kinds.parse(kind, config, svc.settings, Resolver(svc.settings, svc.engine))
        job, _ = jobs.create(svc.engine, kind, config, name=name, created_by=principal.key_id, idempotency_key=None)
    except json.JSONDecodeError as error:
        return _form(request, session, principal, fields, f"config: not valid JSON ({error})")
    except (ServiceError, DistillError) as error:
        return _form(request, session, principal, fields, getattr(error, "message", None) or str(error))
    return RedirectResponse(f"/ui/jobs/{job['id']}", status_code=303)


@router.get("/jobs/{job_id}")
def job_page(job_id: str, request: Request) -> HTMLResponse:
    principal, session = current(request, "read")
    svc = services(request)
    job = jobs.get(svc.engine, job_id)
    try:
        built, report_error = _report(svc, job), None
    except ServiceError as error:  # its report files are unreadable: the page still shows the rest
        built, report_error = None, error.message
    images = {name: _png(png) for name, png in built.images.items()} if built else {}
    status, manifest = jobs.artifacts(svc.engine, job_id)
    recent, _ = jobs.events(svc.engine, job_id, max(0, job["events"] - 50), 50)
    return _page(
        request,
        "job.html",
        job=job,
        figures=_figures(job),
        report=built,
        report_error=report_error,
        images=images,
        artifacts=manifest if status in jobs.TERMINAL else [],
        events=recent,
        has_curves=bool(_history(svc.engine, job)),
        terminal=job["status"] in jobs.TERMINAL,
        config=json.dumps(job["config"], indent=2),
        session=session,
        who=principal,
    )


@router.get("/jobs/{job_id}/curves.png")
def curves(job_id: str, request: Request) -> Response:
    """The learning curves and loss terms so far (the report's plot), redrawn as epochs arrive."""
    current(request, "read")
    svc = services(request)
    history = _history(svc.engine, jobs.get(svc.engine, job_id))
    if not history:
        raise ServiceError(404, f"job {job_id} has no finished epoch yet", code="not_found")
    return Response(plots.learning_curves(history), media_type="image/png", headers={"Cache-Control": "no-store"})


@router.get("/jobs/{job_id}/events")
def events(
    job_id: str, request: Request, after: int | None = Query(None, ge=0, le=routes_events.MAX_EVENT)
) -> StreamingResponse:
    """The job's events as server-sent events, for the page's script (the REST stream, with the session's login)."""
    current(request, "read")
    svc = services(request)
    jobs.get(svc.engine, job_id)
    start = routes_events._after(after, request.headers.get("last-event-id"))
    return StreamingResponse(
        routes_events._stream(svc, job_id, start, request),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


@router.get("/jobs/{job_id}/artifacts/{path:path}")
def download(job_id: str, path: str, request: Request) -> Response:
    principal, _ = current(request, "read")
    return routes_artifacts.download(job_id, path, request, principal)


@router.post("/jobs/{job_id}/{action}")
def job_action(job_id: str, action: str, request: Request, csrf: str = Form("")) -> RedirectResponse:
    _, session = current(request, "write")
    check_csrf(session.csrf, csrf)
    if action not in ("cancel", "retry"):
        raise ServiceError(404, f"no action {action!r}; cancel or retry", code="not_found")
    (jobs.cancel if action == "cancel" else jobs.retry)(services(request).engine, job_id)
    return RedirectResponse(f"/ui/jobs/{job_id}", status_code=303)


@router.get("/compare")
def compare(request: Request, job: list[str] = Query(default_factory=list)) -> HTMLResponse:
    """Each chosen run's teacher and distilled student on one accuracy-versus-size chart."""
    principal, session = current(request, "read")
    svc = services(request)
    chosen = [jobs.get(svc.engine, job_id) for job_id in dict.fromkeys(job[:20])]
    rows = [{**j, "figures": _figures(j)} for j in chosen if _figures(j)]
    points = []
    for row in rows:
        label = (row["name"] or row["id"][:12]).replace("$", r"\$")  # a `$` would start matplotlib's mathtext
        metrics = row["metrics"]
        points.append({"name": f"teacher ({label})", **_point(metrics["teacher"])})
        points.append({"name": label, **_point(metrics["student_distilled"])})
    chart = _png(plots.accuracy_vs_size(points)) if points else None
    return _page(request, "compare.html", rows=rows, chart=chart, session=session, who=principal)


def _point(part: dict[str, Any]) -> dict[str, Any]:
    return {"params": part["params"], "accuracy": part["accuracy"]}


# ----------------------------------------------------------------------------------------------------------------
# API keys (admin)
# ----------------------------------------------------------------------------------------------------------------


@router.get("/keys")
def keys_page(request: Request) -> HTMLResponse:
    principal, session = current(request, "admin")
    return _keys(request, session, principal)


def _keys(request: Request, session: Any, principal: Any, created: str | None = None, error: str | None = None) -> Any:
    listed = auth.list_keys(services(request).engine)
    return _page(
        request,
        "keys.html",
        422 if error else 200,
        keys=listed,
        scopes=auth.SCOPES,
        created=created,
        error=error,
        session=session,
        who=principal,
    )


@router.post("/keys")
def create_key(
    request: Request, name: str = Form(""), scopes: list[str] = Form(default_factory=list), csrf: str = Form("")
) -> HTMLResponse:
    principal, session = current(request, "admin")
    check_csrf(session.csrf, csrf)
    try:
        chosen = auth.parse_scopes(scopes)
    except DistillError as error:
        return _keys(request, session, principal, error=str(error))
    key, _ = auth.create_key(services(request).engine, chosen, name.strip()[:200])
    return _keys(request, session, principal, created=key)


@router.post("/keys/{key_id}/revoke")
def revoke_key(key_id: str, request: Request, csrf: str = Form("")) -> RedirectResponse:
    _, session = current(request, "admin")
    check_csrf(session.csrf, csrf)
    auth.revoke_key(services(request).engine, key_id)
    return RedirectResponse("/ui/keys", status_code=303)


# ----------------------------------------------------------------------------------------------------------------
# Mounting
# ----------------------------------------------------------------------------------------------------------------


def _login_required(request: Request, error: Exception) -> Response:
    assert isinstance(error, LoginRequired)
    from urllib.parse import quote

    return RedirectResponse(f"/ui/login?next={quote(error.next_path, safe='/')}", status_code=303)


def _forbidden(request: Request, error: Exception) -> Response:
    assert isinstance(error, Forbidden)
    return _page(request, "error.html", 403, message=error.message)


DASHBOARD_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
REPORT_CSP = "default-src 'none'; style-src 'unsafe-inline'; img-src data:; frame-ancestors 'none'; base-uri 'none'"


class SecurityHeaders:
    """ASGI middleware: every response is `nosniff` and may not be framed; the dashboard's pages also carry a
    Content-Security-Policy that allows only the service's own scripts, styles and images (and inline PNGs), and an
    HTML report (self-contained: inline style and images) one that allows no script at all."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        csp = DASHBOARD_CSP if path.startswith("/ui") else REPORT_CSP if path.endswith("/report") else None
        extra = [(b"x-content-type-options", b"nosniff"), (b"x-frame-options", b"DENY")]
        extra += [(b"content-security-policy", csp.encode()), (b"referrer-policy", b"same-origin")] if csp else []

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        await self.app(scope, receive, with_headers)


def mount(app: FastAPI) -> None:
    """Add the dashboard to the service's app: the pages, their static files, `/` leading to them, and the
    security headers of every response."""
    app.add_middleware(SecurityHeaders)
    app.include_router(router)
    app.mount("/ui/static", StaticFiles(directory=HERE / "static"), name="ui-static")
    app.add_exception_handler(LoginRequired, _login_required)
    app.add_exception_handler(Forbidden, _forbidden)

    @app.get("/", include_in_schema=False)
    def root() -> RedirectResponse:
        return RedirectResponse("/ui/", status_code=303)
