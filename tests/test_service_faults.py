"""Faults on a real service: a worker SIGKILLed mid-training (another resumes from the checkpoint), a worker frozen
past its lease (the new owner waits: never two runners at once), a service restarted mid-job (nothing lost), a
cooperative cancel and a retry that resumes, and PostgreSQL restarted under load (slow)."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import httpx
import pytest

from _service import (
    QUICK_RECIPE,
    SLOW_RECIPE,
    Service,
    Worker,
    all_events,
    free_port,
    stop_all,
    store_url,
    wait_status,
)


def wait_event(client, job_id, check, timeout=120.0):
    """The first event for which `check(event)` holds, polling."""
    deadline, after = time.monotonic() + timeout, 0
    while time.monotonic() < deadline:
        for event in client.get(f"/v1/jobs/{job_id}/events", params={"after": after}).json()["data"]:
            after = event["id"]
            if check(event):
                return event
        time.sleep(0.2)
    raise AssertionError(f"no such event for {job_id}: {all_events(client, job_id)[-5:]}")


def teacher_progress(minimum):
    """The teacher's training has reached step `minimum` (a progress or an epoch event says so)."""

    def check(e):
        if e["kind"] == "progress":
            return e["data"]["stage"] == "teacher-0" and e["data"]["done"] >= minimum
        return e["kind"] == "epoch" and e["data"]["run"] == "teacher-0" and e["data"]["step"] >= minimum

    return check


def running_by(worker):
    return lambda e: e["kind"] == "status" and e["data"].get("status") == "running" and e["data"]["worker"] == worker


def after_claim(events, worker):
    start = next(i for i, e in enumerate(events) if running_by(worker)(e))
    return events[start + 1 :]


def claimed_by(client, job_id, workers):
    """The worker (of `workers`) that took the job first, once it reached the teacher's step 200."""
    name = wait_event(client, job_id, lambda e: e["kind"] == "status" and e["data"].get("status") == "running")
    wait_event(client, job_id, teacher_progress(200))
    return next(w for w in workers if w.name == name["data"]["worker"])


@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgresql", marks=pytest.mark.slow)])
def test_killed_worker_is_replaced_and_the_job_resumes_from_its_checkpoint(backend, tmp_path):
    with store_url(backend, tmp_path) as url:
        data = tmp_path / "data"
        service, workers = None, []
        try:
            service = Service(data, url).start(wait=False)  # the processes start side by side
            workers = [Worker(data, url, name="one"), Worker(data, url, name="two")]
            service.wait_ready()
            with service.client() as client:
                jid = client.post("/v1/jobs", json={"kind": "recipe", "config": SLOW_RECIPE}).json()["id"]
                victim = claimed_by(client, jid, workers)
                victim.kill()  # SIGKILL mid-training: no goodbye, the lease just stops being renewed
                survivor = next(w for w in workers if w is not victim)
                job = wait_status(client, jid, ("succeeded", "failed"), timeout=240)
                assert job["status"] == "succeeded", job["error"]
                assert job["attempts"] == 2
                events = all_events(client, jid)
        finally:
            stop_all(*workers, service)
    expired = [e for e in events if e["kind"] == "lease_expired"]
    assert len(expired) == 1 and expired[0]["data"]["worker"] == victim.name
    resumed = after_claim(events, survivor.name)
    assert resumed[0]["kind"] == "resumed"
    first_progress = next(e for e in resumed if e["kind"] == "progress" and e["data"]["stage"] == "teacher-0")
    # checkpoints come every 5 steps and at epoch ends: the new worker starts where the first was killed, not at 0
    assert first_progress["data"]["done"] >= 200, first_progress
    assert [e["id"] for e in events] == list(range(1, len(events) + 1))
    assert [e["data"]["status"] for e in events if e["kind"] == "status"] == [
        "queued",
        "running",
        "running",
        "succeeded",
    ]


def test_a_frozen_worker_never_runs_alongside_its_successor(tmp_path):
    data = tmp_path / "data"
    service, workers, frozen = None, [], None
    try:
        service = Service(data).start(wait=False)
        workers = [Worker(data, name="one"), Worker(data, name="two")]
        service.wait_ready()
        with service.client() as client:
            jid = client.post("/v1/jobs", json={"kind": "recipe", "config": SLOW_RECIPE}).json()["id"]
            frozen = claimed_by(client, jid, workers)
            successor = next(w for w in workers if w is not frozen)
            claim = None
            for _ in range(4):
                frozen.process.send_signal(signal.SIGSTOP)  # alive, holding the job's folder, but silent
                try:
                    claim = wait_event(client, jid, running_by(successor.name), timeout=30)
                    break
                except AssertionError:
                    # Stopped inside a write to the SQLite store, it holds the database's lock and nobody can
                    # claim the job: let it finish that write and stop it again at another moment.
                    frozen.process.send_signal(signal.SIGCONT)
                    time.sleep(0.5)
            assert claim is not None, "the successor never took over the frozen worker's job"
            time.sleep(2)
            # the successor owns the lease but waits for the frozen process to let go of the job's folder
            quiet = client.get(f"/v1/jobs/{jid}/events", params={"after": claim["id"]}).json()["data"]
            assert [e["kind"] for e in quiet] == [], quiet
            frozen.process.send_signal(signal.SIGCONT)  # it notices its lease ran out and stops at the next step
            job = wait_status(client, jid, ("succeeded", "failed"), timeout=240)
            assert job["status"] == "succeeded", job["error"]
            events = all_events(client, jid)
    finally:
        if frozen is not None and frozen.process.poll() is None:
            frozen.process.send_signal(signal.SIGCONT)
        stop_all(*workers, service)
    assert after_claim(events, successor.name)[0]["kind"] == "resumed"
    assert "lease" in frozen.log.read_text()  # it let go: "lease was lost" or "could not be renewed in time"


def test_service_restart_loses_nothing_and_cancel_then_retry_resumes(tmp_path):
    data = tmp_path / "data"
    service = worker = None
    try:
        service = Service(data).start(wait=False)
        worker = Worker(data, name="w")
        service.wait_ready()
        with service.client() as client:
            done = client.post("/v1/jobs", json={"kind": "recipe", "config": QUICK_RECIPE}).json()["id"]
            longer = {
                **SLOW_RECIPE,
                "teacher_train": {**SLOW_RECIPE["teacher_train"], "epochs": 100},
            }  # outlasts a restart (1,000 teacher steps: a faster step finished 300 during one)
            running = client.post("/v1/jobs", json={"kind": "recipe", "config": longer}).json()["id"]
            assert wait_status(client, done, ("succeeded", "failed"))["status"] == "succeeded"
            manifest = client.get(f"/v1/jobs/{done}/artifacts").json()["data"]
            wait_event(client, running, teacher_progress(50))
            before = {jid: all_events(client, jid) for jid in (done, running)}
        service.stop(signal.SIGKILL)  # the API process dies mid-job; the worker carries on
        service.start()
        with service.client() as client:
            assert {done, running} <= {j["id"] for j in client.get("/v1/jobs").json()["data"]}
            assert client.get(f"/v1/jobs/{done}/artifacts").json()["data"] == manifest
            weights = client.get(f"/v1/jobs/{done}/artifacts/student/model.safetensors")
            entry = next(a for a in manifest if a["path"] == "student/model.safetensors")
            assert hashlib.sha256(weights.content).hexdigest() == entry["sha256"]
            # a cooperative cancel of the running job, then a retry that continues from its checkpoint
            requested = client.post(f"/v1/jobs/{running}/cancel").json()
            assert requested["cancel_requested"] and requested["status"] in ("running", "cancelled")
            cancelled = wait_status(client, running, ("cancelled", "succeeded", "failed"), timeout=60)
            assert cancelled["status"] == "cancelled", cancelled
            assert client.post(f"/v1/jobs/{running}/retry").json()["status"] == "queued"
            job = wait_status(client, running, ("succeeded", "failed"), timeout=240)
            assert job["status"] == "succeeded", job["error"]
            events = {jid: all_events(client, jid) for jid in (done, running)}
    finally:
        stop_all(worker, service)
    for jid in (done, running):
        assert events[jid][: len(before[jid])] == before[jid]  # nothing lost or rewritten
        assert [e["id"] for e in events[jid]] == list(range(1, len(events[jid]) + 1))
    kinds = [e["kind"] for e in events[running]]
    assert kinds.index("cancel_requested") < kinds.index("resumed")
    statuses = [e["data"]["status"] for e in events[running] if e["kind"] == "status"]
    assert statuses == ["queued", "running", "cancelled", "queued", "running", "succeeded"]
    resumed = [e for e in events[running][kinds.index("resumed") :] if e["kind"] == "progress"][0]
    assert resumed["data"]["stage"] == "teacher-0" and resumed["data"]["done"] >= 50  # from its checkpoint, not 0


# ----------------------------------------------------------------------------------------------------------------
# PostgreSQL restarted under load: a private server (initdb) that the test may stop and start
# ----------------------------------------------------------------------------------------------------------------


def _as_postgres(*command: str) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *command] if os.geteuid() == 0 else list(command)


@pytest.fixture
def private_postgres():
    bindir = next(
        (Path(p) for p in ("/usr/lib/postgresql/15/bin", "/usr/lib/postgresql/16/bin") if Path(p).is_dir()), None
    )
    initdb = bindir / "initdb" if bindir else shutil.which("initdb")
    if initdb is None or (os.geteuid() == 0 and shutil.which("runuser") is None):
        pytest.skip("no initdb (PostgreSQL server binaries) to start a private server")
    folder = Path(tempfile.mkdtemp(prefix="distill-pg-"))  # not under pytest's folders, which only root may enter
    os.chmod(folder, 0o700)
    if os.geteuid() == 0:
        shutil.chown(folder, "postgres", "postgres")
    subprocess.run(_as_postgres(str(initdb), "-D", str(folder / "data"), "-A", "trust", "-U", "postgres"),
                   check=True, capture_output=True)  # fmt: skip
    port = free_port()
    pg_ctl = str(Path(initdb).parent / "pg_ctl")
    options = f"-p {port} -k {folder} -c listen_addresses=127.0.0.1"

    def ctl(action: str) -> None:
        extra = ["-o", options, "-l", str(folder / "log")] if action in ("start", "restart") else []
        subprocess.run(_as_postgres(pg_ctl, "-D", str(folder / "data"), "-w", "-m", "fast", *extra, action),
                       check=True, capture_output=True)  # fmt: skip

    ctl("start")
    try:
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres", ctl
    finally:
        subprocess.run(_as_postgres(pg_ctl, "-D", str(folder / "data"), "-m", "immediate", "stop"), capture_output=True)
        shutil.rmtree(folder, ignore_errors=True)


def create_with_retries(client, body, key, deadline):
    """POST a job with an Idempotency-Key, repeating the same request through outages (503, dropped connections)."""
    while time.monotonic() < deadline:
        try:
            response = client.post("/v1/jobs", json=body, headers={"Idempotency-Key": key})
        except httpx.HTTPError:
            time.sleep(0.2)
            continue
        if response.status_code in (200, 201):
            return response.json()["id"]
        assert response.status_code == 503, response.text
        time.sleep(0.2)
    raise AssertionError(f"could not create job {key}")


@pytest.mark.slow
def test_postgres_restart_under_load(private_postgres, tmp_path):
    url, ctl = private_postgres
    data = tmp_path / "data"
    service = None
    workers: list[Worker] = []
    try:
        service = Service(data, url).start()
        workers = [Worker(data, url, name=f"w{i}", lease=6) for i in range(2)]
        with service.client(timeout=10) as client:
            ids = [client.post("/v1/jobs", json={"kind": "recipe", "config": {**QUICK_RECIPE, "seed": i}}).json()["id"]
                   for i in range(4)]  # fmt: skip
            wait_event(client, ids[0], lambda e: e["kind"] == "progress")
            created: list[str] = []
            deadline = time.monotonic() + 120

            def load() -> None:  # clients keep creating jobs while the database restarts
                with service.client(timeout=10) as other:
                    for i in range(3):
                        body = {"kind": "recipe", "config": {**QUICK_RECIPE, "seed": 10 + i}}
                        created.append(create_with_retries(other, body, f"load-{i}", deadline))
                        time.sleep(0.5)

            loader = threading.Thread(target=load)
            loader.start()
            ctl("restart")
            ctl("restart")
            loader.join()
            ids += created
            unavailable = 0
            deadline = time.monotonic() + 400
            final: dict[str, dict] = {}
            while len(final) < len(ids) and time.monotonic() < deadline:
                for jid in ids:
                    try:
                        response = client.get(f"/v1/jobs/{jid}")
                    except httpx.HTTPError:
                        unavailable += 1
                        continue
                    if response.status_code == 503:
                        unavailable += 1
                    elif response.json()["status"] in ("succeeded", "failed", "cancelled"):
                        final[jid] = response.json()
                time.sleep(0.5)
            listed = {j["id"] for j in client.get("/v1/jobs", params={"limit": 1000}).json()["data"]}
            for jid in ids:
                events = all_events(client, jid)
                assert [e["id"] for e in events] == list(range(1, len(events) + 1))
                assert events[-1]["kind"] == "status" and events[-1]["data"]["status"] == final[jid]["status"]
    finally:
        stop_all(*workers, service)
    assert len(created) == 3 and listed == set(ids)  # every job once: retried creates made no duplicates
    assert set(final) == set(ids), final  # none lost
    for job in final.values():
        assert job["status"] == "succeeded" or (job["status"] == "failed" and job["error"]), job
