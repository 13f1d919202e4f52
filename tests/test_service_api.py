"""The REST API on a real server (uvicorn in a subprocess, httpx as the client), on SQLite and PostgreSQL:
uploads, job creation and its errors, idempotency, cancel/retry, events (polled and streamed), keys and binding."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import pytest

from _service import Service, cli_env, distill_cli, free_port, store_url
from distill.service import auth, db
from distill.service.settings import Settings

UNKNOWN = "job-" + "0" * 24


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_api(backend, tmp_path):
    """One service per store (starting one costs seconds), every check of this file against it."""
    with store_url(backend, tmp_path) as url:
        service = Service(tmp_path / "data", url, "--max-upload-mb", "1").start()
        try:
            with service.client() as client:
                for check in CHECKS:
                    check(client)
        finally:
            service.stop()


def error_of(response, status):
    assert response.status_code == status, response.text
    return response.json()["error"]


def health_and_open_mode_on_loopback(client):
    assert client.get("/healthz").json()["status"] == "ok"
    assert client.get("/v1/jobs").status_code == 200  # no key exists: loopback callers need none
    rebound = client.get("/v1/jobs", headers={"Host": "attacker.example:80"})
    assert error_of(rebound, 401)["code"] == "open_mode"  # DNS rebinding: the Host must be loopback too


def upload_validation_size_limit_and_checksum(client):
    content = b"f1,f2,label\n0.5,1.5,0\n2.5,3.5,1\n"
    response = client.post("/v1/files", files={"file": ("rows.csv", content)}, data={"purpose": "train"})
    assert response.status_code == 201, response.text
    record = response.json()
    assert (
        record["sha256"] == hashlib.sha256(content).hexdigest()
        and record["rows"] == 2
        and record["bytes"] == len(content)
    )
    assert client.get(f"/v1/files/{record['id']}").json()["filename"] == "rows.csv"
    assert client.get(f"/v1/files/{record['id']}/content").content == content
    assert record["id"] in [f["id"] for f in client.get("/v1/files").json()["data"]]
    bad = client.post("/v1/files", files={"file": ("rows.csv", b"a,b\n1\n")})
    assert error_of(bad, 422)["param"] == "file" and "line 2" in bad.json()["error"]["message"]
    assert error_of(client.post("/v1/files", data={"purpose": "train"}), 422)["param"] == "file"
    assert error_of(client.post("/v1/files", files={"file": ("x.exe", b"MZ")}), 422)["param"] == "file"
    purpose = client.post("/v1/files", files={"file": ("a.txt", b"hi\n")}, data={"purpose": "../../etc"})
    assert error_of(purpose, 422)["param"] == "purpose"
    huge = b"x" * (1024 * 1024 + 200_000) + b"\n"
    assert error_of(client.post("/v1/files", files={"file": ("big.txt", huge)}), 413)
    assert client.get("/v1/files/file-" + "0" * 24).status_code == 404


def bad_job_payloads_name_the_field(client):
    cases = [
        ({"kind": "recipe", "config": {"student_width": -3}}, "config.student_width"),
        ({"kind": "recipe", "config": {"train": {"lr": 0}}}, "config.train"),
        ({"kind": "recipe", "config": {"recipe": "nope"}}, "config.recipe"),
        ({"kind": "train", "config": {"data": {"train": "/etc/passwd"}}}, "config.data.train"),
        ({"kind": "train", "config": {"data": {"train": "file-" + "a" * 24}}}, "config.data.train"),
        ({"kind": "rm -rf", "config": {}}, "kind"),
        ({"kind": "recipe", "config": []}, "config"),
        ({"kind": "recipe", "bogus": 1}, "bogus"),
        ({"kind": "recipe", "config": {}, "name": "x" * 300}, "name"),
    ]
    for body, field in cases:
        error = error_of(client.post("/v1/jobs", json=body), 422)
        assert error["param"] == field, (body, error)
        assert error["message"].startswith(field), error
    assert error_of(client.post("/v1/jobs", content=b"{", headers={"content-type": "application/json"}), 422)
    big = client.post("/v1/jobs", json={"kind": "recipe", "config": {}, "name": "x" * 2_000_000})
    assert error_of(big, 413)["code"] == "too_large"


def idempotency_key(client):
    body = {"kind": "recipe", "config": {"epochs": 1}, "name": "idem"}
    first = client.post("/v1/jobs", json=body, headers={"Idempotency-Key": "k-1"})
    again = client.post("/v1/jobs", json=body, headers={"Idempotency-Key": "k-1"})
    assert first.status_code == 201 and again.status_code == 200 and first.json()["id"] == again.json()["id"]
    changed = client.post("/v1/jobs", json={**body, "name": "other"}, headers={"Idempotency-Key": "k-1"})
    assert error_of(changed, 409)["param"] == "Idempotency-Key"
    client.post(f"/v1/jobs/{first.json()['id']}/cancel")


def unknown_ids_are_404(client):
    for method, path in [
        ("GET", f"/v1/jobs/{UNKNOWN}"),
        ("POST", f"/v1/jobs/{UNKNOWN}/cancel"),
        ("POST", f"/v1/jobs/{UNKNOWN}/retry"),
        ("GET", f"/v1/jobs/{UNKNOWN}/events"),
        ("GET", f"/v1/jobs/{UNKNOWN}/events?stream=true"),
        ("GET", f"/v1/jobs/{UNKNOWN}/artifacts"),
        ("GET", f"/v1/jobs/{UNKNOWN}/artifacts/student/model.json"),
        ("GET", f"/v1/jobs/{UNKNOWN}/report"),
        ("GET", "/v1/deployments/nothing"),
        ("GET", "/v1/jobs?after=" + UNKNOWN),
    ]:
        assert error_of(client.request(method, path), 404)["code"] == "not_found", path
    missing = client.post(
        "/v1/chat/completions", json={"model": UNKNOWN, "messages": [{"role": "user", "content": "[1]"}]}
    )
    assert error_of(missing, 404)["code"] == "model_not_found"


def cancel_retry_and_state_conflicts(client):
    job = client.post("/v1/jobs", json={"kind": "recipe", "config": {"epochs": 1}}).json()
    jid = job["id"]
    assert job["status"] == "queued" and job["events"] == 1
    assert error_of(client.get(f"/v1/jobs/{jid}/artifacts"), 409)
    assert error_of(client.get(f"/v1/jobs/{jid}/report"), 409)
    assert error_of(client.post(f"/v1/jobs/{jid}/retry"), 409)
    assert client.post(f"/v1/jobs/{jid}/cancel").json()["status"] == "cancelled"
    assert error_of(client.post(f"/v1/jobs/{jid}/cancel"), 409)
    assert client.get(f"/v1/jobs/{jid}/artifacts").json()["data"] == []
    assert client.post(f"/v1/jobs/{jid}/retry").json()["status"] == "queued"
    assert client.post(f"/v1/jobs/{jid}/cancel").json()["status"] == "cancelled"
    listed = client.get("/v1/jobs", params={"status": "cancelled", "limit": 1000}).json()["data"]
    assert jid in [j["id"] for j in listed]
    assert error_of(client.get("/v1/jobs", params={"status": "weird"}), 422)["param"] == "status"


def sse(client, path, headers=None):
    """The events of a server-sent event stream, until it closes."""
    events, current = [], {}
    with client.stream("GET", path, headers=headers or {}, timeout=30) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if not line:
                if "event" in current:
                    events.append(current)
                current = {}
            elif not line.startswith(":") and ":" in line:
                field, value = line.split(":", 1)
                current[field] = value.strip()
    return events


def events_poll_and_stream_resume(client):
    jid = client.post("/v1/jobs", json={"kind": "recipe", "config": {"seed": 5}}).json()["id"]
    client.post(f"/v1/jobs/{jid}/cancel")
    client.post(f"/v1/jobs/{jid}/retry")
    client.post(f"/v1/jobs/{jid}/cancel")
    polled = client.get(f"/v1/jobs/{jid}/events").json()
    assert [e["id"] for e in polled["data"]] == [1, 2, 3, 4] and polled["status"] == "cancelled"
    assert [e["data"]["status"] for e in polled["data"]] == ["queued", "cancelled", "queued", "cancelled"]
    assert [e["id"] for e in client.get(f"/v1/jobs/{jid}/events", params={"after": 2}).json()["data"]] == [3, 4]
    streamed = sse(client, f"/v1/jobs/{jid}/events?stream=true")
    assert [e.get("id") for e in streamed] == ["1", "2", "3", "4", None]
    assert streamed[-1]["event"] == "end" and json.loads(streamed[-1]["data"])["status"] == "cancelled"
    resumed = sse(client, f"/v1/jobs/{jid}/events", headers={"Accept": "text/event-stream", "Last-Event-ID": "2"})
    assert [e.get("id") for e in resumed] == ["3", "4", None]
    assert json.loads(resumed[0]["data"])["data"]["status"] == "queued"
    assert (
        error_of(client.get(f"/v1/jobs/{jid}/events", headers={"Last-Event-ID": "x"}), 422)["param"] == "Last-Event-ID"
    )


CHECKS = [
    health_and_open_mode_on_loopback,
    upload_validation_size_limit_and_checksum,
    bad_job_payloads_name_the_field,
    idempotency_key,
    unknown_ids_are_404,
    cancel_retry_and_state_conflicts,
    events_poll_and_stream_resume,
]


def open_store(data):
    engine = db.open_engine(Settings(data_dir=data).url, pool_size=1)
    db.ensure_schema(engine)
    return engine


def test_keys_scopes_and_binding(tmp_path):
    data = tmp_path / "data"
    port = free_port()
    refused = subprocess.run(
        [sys.executable, "-m", "distill.cli", "service", "--data-dir", str(data), "--host", "0.0.0.0", "--port", str(port)],
        capture_output=True, text=True, timeout=60, env=cli_env(),
    )  # fmt: skip
    assert refused.returncode == 2 and "refusing to listen on 0.0.0.0" in refused.stderr, refused.stderr
    made = distill_cli("service", "keys", "create", "--scopes", "read", "--name", "ci", "--data-dir", data)
    assert made.returncode == 0, made.stderr
    reader = made.stdout.strip()
    assert reader.startswith("dsk-") and "not shown again" in made.stderr
    admin = auth.create_key(open_store(data), ["admin"])[0]
    service = Service(data, None, host="0.0.0.0").start()  # a key exists now: it may listen beyond loopback
    try:
        with service.client() as anonymous, service.client(reader) as read, service.client(admin) as root:
            assert error_of(anonymous.get("/v1/jobs"), 401)["code"] == "missing_api_key"
            assert anonymous.get("/v1/jobs").headers["www-authenticate"] == "Bearer"
            assert error_of(anonymous.get("/v1/jobs", headers={"Authorization": "Bearer dsk-x-y"}), 401)
            assert read.get("/v1/jobs").status_code == 200
            assert error_of(read.post("/v1/jobs", json={"kind": "recipe"}), 403)["code"] == "insufficient_scope"
            assert error_of(read.get("/v1/models"), 403)
            assert error_of(read.get("/v1/keys"), 403)
            created = root.post("/v1/keys", json={"scopes": ["write", "infer"], "name": "api"}).json()
            assert created["scopes"] == ["write", "infer"] and created["key"].startswith("dsk-")
            assert error_of(root.post("/v1/keys", json={"scopes": ["god"]}), 422)["param"] == "scopes"
            with service.client(created["key"]) as writer:
                assert writer.post("/v1/jobs", json={"kind": "recipe", "config": {"epochs": 1}}).status_code == 201
                assert writer.get("/v1/models").status_code == 200
                assert root.delete(f"/v1/keys/{created['id']}").json()["revoked"]
                import time

                time.sleep(2.5)  # verified keys are remembered for two seconds
                assert error_of(writer.get("/v1/models"), 401)["code"] == "invalid_api_key"
            assert error_of(root.delete(f"/v1/keys/{created['id']}"), 404)
    finally:
        service.stop()
