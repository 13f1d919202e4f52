"""Hostile requests against a real `distill service` (a subprocess on loopback): each answers with a clear 4xx in
OpenAI's error shape, never a 500, and where memory was the problem the server's peak RSS grows by less than 64 MB
while it handles the request."""

from __future__ import annotations

import io
import json
import os
import select
import socket
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest

from _rss import MB, PeakRss
from _service import Service, Worker, distill_cli, finished_job, wait_status
from distill.service import db
from distill.service.settings import Settings

MEMORY_BOUND = 64 * MB


def error_of(response, status: int) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and {"message", "type", "param", "code"} <= set(body["error"]), body
    return body["error"]


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


def raw_request(port: int, head: str, body_chunks, *, chunked: bool) -> tuple[int, int]:
    """Send a request by hand (so a chunked body without Content-Length is possible), keep sending its body until the
    server answers or closes, and return (status, body bytes the client managed to send)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sent = 0
    try:
        sock.sendall(head.encode() + b"\r\n")
        for chunk in body_chunks:
            if select.select([sock], [], [], 0)[0]:
                break  # the server answered (or closed) before the body was done
            try:
                sock.sendall(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n" if chunked else chunk)
            except (BrokenPipeError, ConnectionResetError):
                break
            sent += len(chunk)
        else:
            if chunked:
                sock.sendall(b"0\r\n\r\n")
        sock.settimeout(30)
        answer = sock.recv(4096)
    finally:
        sock.close()
    return int(answer.split(b" ", 2)[1]), sent


def zeros(total: int, chunk: int = MB):
    for start in range(0, total, chunk):
        yield b"0" * min(chunk, total - start)


def bomb_npz(path: Path, values: int) -> None:
    """An .npz whose one float64 array of `values` zeros compresses to almost nothing (streamed: never in memory)."""
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<f8", "fortran_order": False, "shape": (values,)})
    with (
        zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive,
        archive.open("x.npy", "w", force_zip64=True) as out,
    ):
        out.write(header.getvalue())
        block = bytes(8 * 1024 * 1024)
        for start in range(0, values * 8, len(block)):
            out.write(block[: min(len(block), values * 8 - start)])


def lying_npz(path: Path, shape: tuple[int, ...]) -> None:
    """A tiny .npz whose header declares `shape` float64 but holds no data at all."""
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<f8", "fortran_order": False, "shape": shape})
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("x.npy", header.getvalue())


@pytest.fixture(scope="module")
def open_service(tmp_path_factory):
    """A service with no key (open mode, loopback) and a 1 MiB upload limit."""
    service = Service(tmp_path_factory.mktemp("open") / "data", None, "--max-upload-mb", "1").start()
    yield service
    service.stop()


def create_key(data_dir: Path, scopes: str = "admin") -> str:
    made = distill_cli("service", "keys", "create", "--scopes", scopes, "--data-dir", data_dir)
    assert made.returncode == 0, made.stderr
    return made.stdout.strip()


@pytest.fixture
def keyed(tmp_path):
    """A service whose data directory has one admin key (created before it starts), and that key."""
    data = tmp_path / "data"
    key = create_key(data)
    service = Service(data, None).start()
    yield service, key
    service.stop()


# ----------------------------------------------------------------------------------------------------------------
# Memory: bodies are counted as they arrive, and nothing is read before the key is checked
# ----------------------------------------------------------------------------------------------------------------


def test_a_chunked_body_without_a_key_is_refused_before_it_is_read(keyed):
    service, _ = keyed
    peak = PeakRss(service.process.pid)
    head = f"POST /v1/jobs HTTP/1.1\r\nHost: 127.0.0.1:{service.port}\r\nContent-Type: application/json\r\n"
    status, _ = raw_request(service.port, head + "Transfer-Encoding: chunked\r\n", zeros(256 * MB), chunked=True)
    assert status == 401
    assert peak.growth() < MEMORY_BOUND, peak.growth() / MB


def test_a_chunked_body_over_the_limit_is_refused_as_it_arrives(keyed):
    service, key = keyed
    peak = PeakRss(service.process.pid)
    head = (
        f"POST /v1/jobs HTTP/1.1\r\nHost: 127.0.0.1:{service.port}\r\nAuthorization: Bearer {key}\r\n"
        "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n"
    )
    status, sent = raw_request(service.port, head, zeros(256 * MB), chunked=True)
    assert status == 413 and sent < 256 * MB
    assert peak.growth() < MEMORY_BOUND, peak.growth() / MB
    declared = head.replace("Transfer-Encoding: chunked", f"Content-Length: {256 * MB}")
    assert raw_request(service.port, declared, zeros(256 * MB), chunked=False)[0] == 413


def test_a_chunked_upload_over_the_limit_is_refused(open_service):
    boundary = "b0undary"
    start = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="big.txt"\r\n'
        "Content-Type: text/plain\r\n\r\n"
    ).encode()
    head = (
        f"POST /v1/files HTTP/1.1\r\nHost: 127.0.0.1:{open_service.port}\r\n"
        f"Content-Type: multipart/form-data; boundary={boundary}\r\nTransfer-Encoding: chunked\r\n"
    )
    peak = PeakRss(open_service.process.pid)
    status, _ = raw_request(open_service.port, head, [start, *zeros(64 * MB)], chunked=True)
    assert status == 413
    assert peak.growth() < MEMORY_BOUND
    assert not list((open_service.data_dir / "files").glob("file-*"))  # nothing was kept


# ----------------------------------------------------------------------------------------------------------------
# Keys: open mode ends for good with the first key
# ----------------------------------------------------------------------------------------------------------------


def test_revoking_the_last_key_does_not_reopen_the_service(keyed):
    service, key = keyed
    with service.client(key) as client:
        assert client.get("/v1/jobs").status_code == 200
        key_id = key.split("-")[1]
    revoked = distill_cli("service", "keys", "revoke", key_id, "--data-dir", service.data_dir)
    assert revoked.returncode == 0, revoked.stderr
    time.sleep(2.5)  # the key cache's ttl
    with service.client() as anonymous:
        assert error_of(anonymous.get("/v1/jobs"), 401)["code"] == "missing_api_key"
        minted = anonymous.post("/v1/keys", json={"scopes": ["admin"]})
        assert error_of(minted, 401)["code"] == "missing_api_key"
        assert error_of(anonymous.get("/openapi.json"), 401)
    with service.client(key) as old:
        assert error_of(old.get("/v1/jobs"), 401)["code"] == "invalid_api_key"
    fresh = create_key(service.data_dir, "read")  # the CLI still creates keys locally
    with service.client(fresh) as reader:
        assert reader.get("/v1/jobs").status_code == 200
        assert error_of(reader.post("/v1/keys", json={"scopes": ["admin"]}), 403)["code"] == "insufficient_scope"


def test_api_docs_need_a_key_once_keys_exist(keyed, open_service):
    service, key = keyed
    with service.client() as anonymous:
        for path in ("/openapi.json", "/docs", "/redoc"):
            assert error_of(anonymous.get(path), 401)
    with service.client(key) as client:
        assert client.get("/openapi.json").json()["info"]["title"] == "distill service"
    with open_service.client() as client:  # loopback without keys: as open as the rest
        assert client.get("/openapi.json").status_code == 200


def test_a_database_with_keys_from_before_needs_keys_after_the_upgrade(tmp_path):
    settings = Settings(data_dir=tmp_path).prepare()
    engine = db.open_engine(settings.url)
    with db.write(engine) as connection:  # a version-1 store: no service_state, one revoked key
        db.schema_info.create(connection)
        db.api_keys.create(connection)
        connection.execute(db.schema_info.insert().values(version=1))
        connection.execute(
            db.api_keys.insert().values(id="k", hash="h", scopes="admin", name="", created_at=0.0, revoked_at=1.0)
        )
    assert db.ensure_schema(engine) == db.SCHEMA_VERSION
    from distill.service import auth

    assert auth.keys_required(engine)


# ----------------------------------------------------------------------------------------------------------------
# Uploads
# ----------------------------------------------------------------------------------------------------------------


def test_decompression_bombs_are_refused_from_their_headers(open_service, tmp_path):
    bomb = tmp_path / "bomb.npz"
    bomb_npz(bomb, 900 * 1000 * 1000 // 8)  # 900 MB of zeros
    assert bomb.stat().st_size < 1024 * 1024
    peak = PeakRss(open_service.process.pid)
    with open_service.client() as client:
        answer = client.post("/v1/files", files={"file": ("bomb.npz", bomb.read_bytes())})
        assert "900,000,000 bytes once loaded" in error_of(answer, 422)["message"]
        assert peak.growth() < MEMORY_BOUND, peak.growth() / MB
        lying = tmp_path / "lying.npz"
        lying_npz(lying, (10**11,))
        assert lying.stat().st_size < 400
        answer = client.post("/v1/files", files={"file": ("lying.npz", lying.read_bytes())})
        assert "800,000,000,000 bytes" in error_of(answer, 422)["message"]
        assert str(open_service.data_dir) not in answer.text and ".part" not in answer.text


def test_bad_text_uploads_name_the_problem(open_service):
    with open_service.client() as client:
        deep = ('{"prompt": ' + nested(100_000) + "}\n").encode()
        assert (
            "more than 64 deep" in error_of(client.post("/v1/files", files={"file": ("d.jsonl", deep)}), 422)["message"]
        )
        latin = b'{"prompt": "caf\xe9"}\n'
        assert "not UTF-8" in error_of(client.post("/v1/files", files={"file": ("l.jsonl", latin)}), 422)["message"]
        latin_csv = b"a,label\n0.5,\xff\n"
        assert "not UTF-8" in error_of(client.post("/v1/files", files={"file": ("l.csv", latin_csv)}), 422)["message"]


# ----------------------------------------------------------------------------------------------------------------
# Request parsing: never a 500
# ----------------------------------------------------------------------------------------------------------------


def test_deeply_nested_json_is_a_400(open_service):
    with open_service.client() as client:
        for path in ("/v1/jobs", "/v1/chat/completions", "/v1/completions", "/v1/deployments", "/v1/keys"):
            body = '{"kind": "recipe", "config": {"x": ' + nested(100_000) + "}}"
            answer = client.post(path, content=body, headers={"content-type": "application/json"})
            assert error_of(answer, 400)["code"] == "json_too_deep", path
        form = client.get("/ui/login")  # the dashboard's form takes a config as JSON text
        assert form.status_code == 200


def test_event_positions_beyond_64_bits_are_a_422(open_service):
    with open_service.client() as client:
        job = client.post("/v1/jobs", json={"kind": "recipe", "config": {"epochs": 1}}).json()["id"]
        events = f"/v1/jobs/{job}/events"
        assert error_of(client.get(events, params={"after": 2**64}), 422)["param"] == "after"
        assert client.get(events, params={"after": 2**63 - 1}).json()["data"] == []
        for header in (
            b"9" * 30,
            b"\xb2",
            b"\xb9\xb2",
            "\u0661\u0662".encode(),
            b"-1",
            b"1e3",
        ):  # \xb2: a 2 superscript
            answer = client.get(events, headers={"Last-Event-ID": header})
            assert error_of(answer, 422)["param"] == "Last-Event-ID", header
        assert error_of(client.get(f"/ui/jobs/{job}/events", params={"after": 2**70}), 422)
        client.post(f"/v1/jobs/{job}/cancel")


def test_origin_of_another_site_is_refused_in_open_mode(open_service):
    with open_service.client() as client:
        own = {"Origin": open_service.url}
        assert client.get("/v1/jobs", headers=own).status_code == 200
        for origin in ("http://evil.example", "null", f"http://localhost:{open_service.port + 1}"):
            answer = client.post("/v1/files", files={"file": ("a.txt", b"hi\n")}, headers={"Origin": origin})
            assert error_of(answer, 403)["code"] == "cross_origin", origin
        assert error_of(client.get("/ui/", headers={"Origin": "http://evil.example"}), 403)


def test_dashboard_pages_carry_security_headers(open_service):
    with open_service.client() as client:
        page = client.get("/ui/login")
        assert page.status_code == 200
        assert "script-src 'self'" in page.headers["content-security-policy"]
        assert "frame-ancestors 'none'" in page.headers["content-security-policy"]
        assert page.headers["x-frame-options"] == "DENY" and page.headers["x-content-type-options"] == "nosniff"
        assert client.get("/v1/jobs").headers["x-content-type-options"] == "nosniff"


# ----------------------------------------------------------------------------------------------------------------
# Reports and job errors
# ----------------------------------------------------------------------------------------------------------------


def finished_job_with(service: Service, files: dict[str, str | Path]) -> str:
    """A job recorded as succeeded whose output folder holds `files` (text, or a Path: a symlink to it)."""
    job_id, output = finished_job(service.data_dir)
    for name, content in files.items():
        if isinstance(content, Path):
            (output / name).symlink_to(content)
        else:
            (output / name).write_text(content)
    return job_id


def test_report_files_are_never_read_through_a_link(open_service, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("outside the job folder")
    linked = finished_job_with(open_service, {"report.md": secret, "metrics.json": secret, "report.html": secret})
    with open_service.client() as client:
        for fmt in ("md", "html", "json"):
            answer = client.get(f"/v1/jobs/{linked}/report", params={"format": fmt})
            assert error_of(answer, 404)["code"] == "not_found" and "outside" not in answer.text, fmt
        plain = finished_job_with(open_service, {"report.md": "# fine", "metrics.json": '{"a": 1}'})
        assert client.get(f"/v1/jobs/{plain}/report").json()["metrics"] == {"a": 1}
        broken = finished_job_with(open_service, {"metrics.json": nested(50_000)})
        assert error_of(client.get(f"/v1/jobs/{broken}/report"), 409)


def test_job_errors_name_uploads_by_id_not_by_server_path(open_service):
    with open_service.client() as client:
        upload = client.post("/v1/files", files={"file": ("rows.csv", b"f1,f2,target\n0.5,1.5,0\n2.5,3.5,1\n")})
        file_id = upload.json()["id"]
        config = {"data": {"train": file_id}, "student": {"family": "mlp", "width": 8, "depth": 1}}
        job = client.post("/v1/jobs", json={"kind": "train", "config": config}).json()["id"]
        worker = Worker(open_service.data_dir, name="redact")
        try:
            failed = wait_status(client, job, ("failed",), timeout=120)
        finally:
            worker.stop()
    assert file_id in failed["error"] and "'label'" in failed["error"], failed["error"]
    assert str(open_service.data_dir.resolve()) not in failed["error"] and "/files/" not in failed["error"]


# ----------------------------------------------------------------------------------------------------------------
# The service's command line
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "option",
    [["--max-upload-mb", "-1"], ["--port", "99999"], ["--max-body-kb", "0"], ["--max-n", "0"]],
)
def test_service_options_out_of_range_are_one_error_line(option, tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "distill.cli", "service", "--data-dir", str(tmp_path), *option],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and option[0] in lines[0], done.stderr


def test_json_parse_of_the_api_never_recurses(open_service):
    """A body that is valid JSON but 60 levels deep (under the bound) still gets a 422, not a 500."""
    with open_service.client() as client:
        body = json.dumps({"kind": "recipe", "config": {"loss": json.loads(nested(60))}})
        assert error_of(client.post("/v1/jobs", content=body, headers={"content-type": "application/json"}), 422)


def test_absurd_job_parameters_are_refused_at_creation(open_service):
    """What a job would have accepted and then run for ever, or failed with an internal error: a 422 naming the
    field, before anything is queued."""
    cases = [
        ({"transfer_size": 10**12}, "config.transfer_size"),
        ({"epochs": 10**30}, "config.epochs"),
        ({"student": {"family": "mlp", "width": 65536, "depth": 64}}, "config.student"),
        ({"seed": 10**30}, "config.seed"),
        ({"teachers": 10**6}, "config.teachers"),
    ]
    with open_service.client() as client:
        before = len(client.get("/v1/jobs", params={"limit": 1000}).json()["data"])
        for config, field in cases:
            assert error_of(client.post("/v1/jobs", json={"kind": "recipe", "config": config}), 422)["param"] == field
        infinite = '{"kind": "recipe", "config": {"loss": {"temperature": Infinity}}}'
        answer = client.post("/v1/jobs", content=infinite, headers={"content-type": "application/json"})
        assert error_of(answer, 422)["param"] == "config.loss.temperature"
        assert len(client.get("/v1/jobs", params={"limit": 1000}).json()["data"]) == before
