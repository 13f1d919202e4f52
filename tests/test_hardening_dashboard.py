"""Hostile input against the dashboard (in process): every page carries its security headers, a page of another site
cannot post in open mode, and bad input (a config nested 100,000 deep, event positions beyond 64 bits, report files
that are links or not UTF-8) gives a clear answer, never a 500."""

from __future__ import annotations

import json
import re

import pytest
from fastapi.testclient import TestClient

from distill.service import auth, db, jobs
from distill.service.app import create_app
from distill.service.settings import Settings

LOCAL = ("127.0.0.1", 5000)


def csrf_of(page: str) -> str:
    found = re.search(r'name="csrf" value="([^"]+)"', page)
    assert found, page[:500]
    return found.group(1)


@pytest.fixture
def site(tmp_path):
    """The service in process, in open mode, with a loopback client logged in to the dashboard."""
    settings = Settings(data_dir=tmp_path / "data")
    app = create_app(settings)
    with TestClient(app, base_url="http://127.0.0.1:8000", follow_redirects=False, client=LOCAL) as client:
        form = client.get("/ui/login")
        assert client.post("/ui/login", data={"key": "", "csrf": csrf_of(form.text)}).status_code == 303
        yield client, settings, app.state.services.engine


def succeeded(engine, settings: Settings, files: dict[str, bytes], metrics: dict | None = None) -> str:
    job, _ = jobs.create(engine, "recipe", {}, name=None, created_by="local", idempotency_key=None)
    with db.write(engine) as connection:
        update = db.jobs.update().where(db.jobs.c.id == job["id"])
        connection.execute(update.values(status="succeeded", summary=json.dumps(metrics) if metrics else None))
    output = settings.jobs_dir / job["id"] / "output"
    output.mkdir(parents=True)
    for name, content in files.items():
        (output / name).write_bytes(content)
    return str(job["id"])


def test_every_page_carries_the_security_headers(site):
    client, settings, engine = site
    job = succeeded(engine, settings, {})
    for path in ("/ui/login", "/ui/", f"/ui/jobs/{job}", "/ui/jobs/new", "/ui/keys", "/ui/static/job.js"):
        page = client.get(path)
        assert page.status_code == 200, (path, page.status_code)
        policy = page.headers["content-security-policy"]
        assert "default-src 'none'" in policy and "script-src 'self'" in policy and "'unsafe-inline'" not in policy
        assert page.headers["x-frame-options"] == "DENY" and page.headers["x-content-type-options"] == "nosniff"


def test_a_page_of_another_site_cannot_post_in_open_mode(site):
    client, *_ = site
    page = client.get("/ui/jobs/new")
    fields = {"csrf": csrf_of(page.text), "kind": "recipe", "config": "{}"}
    evil = client.post("/ui/jobs", data=fields, headers={"Origin": "http://evil.example"})
    assert evil.status_code == 403 and evil.json()["error"]["code"] == "cross_origin"
    login = client.post("/ui/login", data={"key": ""}, headers={"Origin": "null"})
    assert login.status_code == 403
    own = client.post("/ui/jobs", data=fields, headers={"Origin": "http://127.0.0.1:8000"})
    assert own.status_code == 303 and own.headers["location"].startswith("/ui/jobs/job-")


def test_a_config_nested_too_deep_is_a_form_error(site):
    client, *_ = site
    page = client.get("/ui/jobs/new")
    deep = '{"x": ' + "[" * 100_000 + "]" * 100_000 + "}"
    answer = client.post("/ui/jobs", data={"csrf": csrf_of(page.text), "kind": "recipe", "config": deep})
    assert answer.status_code == 422 and "more than 64 deep" in answer.text and 'id="error"' in answer.text


def test_event_positions_beyond_64_bits_are_refused(site):
    client, settings, engine = site
    job = succeeded(engine, settings, {})
    assert client.get(f"/ui/jobs/{job}/events", params={"after": 2**70}).status_code == 422
    assert client.get(f"/ui/jobs/{job}/events", headers={"Last-Event-ID": "9" * 40}).status_code == 422


def test_unreadable_report_files_leave_the_job_page_up(site, tmp_path):
    client, settings, engine = site
    metrics = {"recipe": "mnist1d", "teacher": {"accuracy": 0.9}, "student_distilled": {"accuracy": 0.8}}
    broken = succeeded(engine, settings, {"metrics.json": b'{"a": "\xff"}'}, metrics)
    page = client.get(f"/ui/jobs/{broken}")
    assert page.status_code == 200 and "not UTF-8" in page.text and 'id="report-error"' in page.text
    secret = tmp_path / "secret.json"
    secret.write_text('{"recipe": "outside the job folder"}')
    linked = succeeded(engine, settings, {}, metrics)
    (settings.jobs_dir / linked / "output" / "metrics.json").symlink_to(secret)
    page = client.get(f"/ui/jobs/{linked}")
    assert page.status_code == 200 and "outside the job folder" not in page.text and "not a regular file" in page.text


def test_keys_exist_then_the_dashboard_needs_a_session(tmp_path):
    settings = Settings(data_dir=tmp_path / "data")
    app = create_app(settings)
    with TestClient(app, base_url="http://127.0.0.1:8000", follow_redirects=False, client=LOCAL) as client:
        key, record = auth.create_key(app.state.services.engine, ["admin"])
        auth.revoke_key(app.state.services.engine, record["id"])
        app.state.services.keys._required = (-float("inf"), False)  # as after the key cache's ttl
        form = client.get("/ui/login")
        assert "log in with an empty key" not in form.text
        assert client.post("/ui/login", data={"key": "", "csrf": csrf_of(form.text)}).status_code == 401
        assert client.get("/ui/").status_code == 303
