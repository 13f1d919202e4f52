"""The dashboard (`distill.service.web`): login, sessions, CSRF, escaping and the pages, against the app in process;
then end to end in Debian's Chromium (headless, driven over the DevTools protocol on a pipe) against a real service
and worker, with screenshots of the main pages written as test artifacts."""

from __future__ import annotations

import base64
import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from _service import TINY_RECIPE, Service, Worker, distill_cli, stop_all
from distill.service import auth, db
from distill.service.app import create_app
from distill.service.settings import Settings

XSS = "<script>alert(1)</script>"


# ----------------------------------------------------------------------------------------------------------------
# In process (fast)
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture
def site(tmp_path):
    app = create_app(Settings(data_dir=tmp_path / "data"))
    engine = app.state.services.engine
    admin, _ = auth.create_key(engine, ["admin"], "admin")
    reader, _ = auth.create_key(engine, ["read"], "reader")
    with TestClient(app, base_url="http://127.0.0.1:8000", follow_redirects=False) as client:
        yield client, engine, {"admin": admin, "reader": reader}


def csrf_of(page: str) -> str:
    found = re.search(r'name="csrf" value="([^"]+)"', page)
    assert found, page[:500]
    return found.group(1)


def login(client: TestClient, key: str) -> Any:
    form = client.get("/ui/login")
    return client.post("/ui/login", data={"key": key, "csrf": csrf_of(form.text), "next": "/ui/"})


def finished_job(engine, name: str, accuracy: float, params: int) -> str:
    """A job row that looks succeeded, with classification metrics (as a recipe writes them)."""
    from distill.service import jobs

    job, _ = jobs.create(engine, "recipe", {"recipe": "mnist1d"}, name=name, created_by="t", idempotency_key=None)
    part = {"accuracy": accuracy, "params": params, "ece": 0.05, "agreement": 0.9, "kl_to_teacher": 0.1}
    reliability = {"edges": [0.0, 0.5, 1.0], "accuracy": [0.4, float("nan")]}
    metrics = {
        "recipe": "mnist1d",
        "teacher": {"accuracy": 0.9, "params": 10_000, "members": 1, "reliability": reliability, "ece": 0.02},
        "student_alone": {**part, "accuracy": accuracy - 0.1, "rows": 500},
        "student_distilled": part,
        "retention": accuracy / 0.9,
        "compression": 10_000 / params,
        "speedup": 2.0,
        "throughput_speedup": 3.0,
        "gap_closed": 0.5,
        "loss": {"divergence": "kl", "temperature": 4.0, "alpha": 0.9},
        "history": {"student-distilled": [{"epoch": 1, "step": 10, "kd": 0.5, "ce": 1.0, "test_accuracy": accuracy}]},
    }
    with db.write(engine) as connection:
        connection.execute(
            db.jobs.update()
            .where(db.jobs.c.id == job["id"])
            .values(status="succeeded", summary=jobs.dumps(metrics), finished_at=time.time())
        )
    return str(job["id"])


def test_unauthenticated_browser_sees_only_the_login_page(site):
    client, _, _ = site
    for path in ("/", "/ui/", "/ui/jobs/new", "/ui/jobs/job-x", "/ui/keys", "/ui/compare?job=a", "/ui/jobs/x/events"):
        response = client.get(path)
        assert response.status_code == 303, path
        location = response.headers["location"]
        if path != "/":
            assert location.startswith("/ui/login?next=/ui/"), location
    page = client.get("/ui/login")
    assert page.status_code == 200 and 'name="key"' in page.text and "Jobs</a>" not in page.text
    assert client.post("/ui/jobs", data={"config": "{}"}).status_code == 303  # no session: to the login page


def test_login_sets_an_httponly_samesite_session_cookie_without_the_key(site):
    client, _, keys = site
    wrong = login(client, "dsk-nope-nothing")
    assert (
        wrong.status_code == 401
        and "not valid" in wrong.text
        and "distill_session" not in wrong.headers.get("set-cookie", "")
    )
    answer = login(client, keys["reader"])
    assert answer.status_code == 303 and answer.headers["location"] == "/ui/"
    cookie = next(c for c in answer.headers.get_list("set-cookie") if c.startswith("distill_session="))
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie
    assert keys["reader"] not in cookie and keys["reader"].split("-")[2] not in cookie
    assert client.get("/ui/").status_code == 200
    # the login form without its CSRF token (or with another) is refused
    client.cookies.clear()
    client.get("/ui/login")
    assert client.post("/ui/login", data={"key": keys["reader"], "csrf": "forged"}).status_code == 403
    # an open redirect through `next` is not followed
    answer = client.post("/ui/login", data={"key": keys["reader"], "csrf": csrf_of(client.get("/ui/login").text),
                                            "next": "//evil.example/"})  # fmt: skip
    assert answer.headers["location"] == "/ui/"


def test_forms_need_the_session_csrf_token_and_scopes(site):
    client, engine, keys = site
    login(client, keys["admin"])
    page = client.get("/ui/jobs/new")
    token = csrf_of(page.text)
    assert client.post("/ui/jobs", data={"config": "{}"}).status_code == 403
    assert client.post("/ui/jobs", data={"config": "{}", "csrf": "x" * 43}).status_code == 403
    bad = client.post("/ui/jobs", data={"config": '{"epochs": "many"}', "csrf": token, "name": XSS})
    assert bad.status_code == 422 and "epochs" in bad.text and XSS not in bad.text
    made = client.post("/ui/jobs", data={"config": '{"epochs": 1}', "csrf": token, "name": "tiny"})
    assert made.status_code == 303 and made.headers["location"].startswith("/ui/jobs/job-")
    job_id = made.headers["location"].rsplit("/", 1)[1]
    job = client.get(f"/ui/jobs/{job_id}")
    assert job.status_code == 200 and "queued" in job.text and "&#34;epochs&#34;: 1" in job.text
    # a job from an uploaded file: its id replaces $FILE in the config
    upload = client.post(
        "/ui/jobs",
        data={"csrf": token, "kind": "recipe", "config": '{"epochs": 1, "seed": 3}', "name": "with file"},
        files={"file": ("notes.txt", b"hello\nworld\n")},
    )
    assert upload.status_code == 303, upload.text
    assert "notes.txt" in client.get("/ui/jobs/new").text
    # cancel needs the token too
    assert client.post(f"/ui/jobs/{job_id}/cancel").status_code == 403
    assert client.post(f"/ui/jobs/{job_id}/cancel", data={"csrf": token}).status_code == 303
    assert "cancelled" in client.get(f"/ui/jobs/{job_id}").text
    # a read-only key may look but not start jobs or see the keys
    other = TestClient(client.app, base_url="http://127.0.0.1:8000", follow_redirects=False)
    login(other, keys["reader"])
    assert other.get("/ui/").status_code == 200
    assert other.get("/ui/jobs/new").status_code == 403 and other.get("/ui/keys").status_code == 403
    assert "New job" not in other.get("/ui/").text


def test_user_strings_are_escaped(site):
    client, engine, keys = site
    login(client, keys["admin"])
    job_id = finished_job(engine, XSS, 0.8, 1000)
    for path in ("/ui/", f"/ui/jobs/{job_id}", f"/ui/compare?job={job_id}"):
        page = client.get(path).text
        assert XSS not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page, path
    token = csrf_of(client.get("/ui/keys").text)
    created = client.post("/ui/keys", data={"name": XSS, "scopes": ["read"], "csrf": token})
    assert created.status_code == 200 and XSS not in created.text and "&lt;script&gt;" in created.text


def test_report_and_comparison_pages_show_the_plots(site):
    client, engine, keys = site
    login(client, keys["reader"])
    small, large = finished_job(engine, "small", 0.8, 1000), finished_job(engine, "large $x_{", 0.85, 4000)
    listing = client.get("/ui/").text
    assert "88.9 %" in listing and "10.0x" in listing  # retention and compression of `small`
    page = client.get(f"/ui/jobs/{small}").text
    assert "Teacher vs student" in page and "keeps <strong>88.9 %</strong>" in page
    assert 'alt="accuracy_vs_params.png" src="data:image/png;base64,' in page
    assert 'alt="reliability.png" src="data:image/png;base64,' in page
    assert f'src="/ui/jobs/{small}/curves.png"' in page
    curves = client.get(f"/ui/jobs/{small}/curves.png")
    assert curves.status_code == 200 and curves.content.startswith(b"\x89PNG")
    compare = client.get(f"/ui/compare?job={small}&job={large}").text
    assert 'id="chart"' in compare and "data:image/png;base64," in compare
    assert compare.count("/ui/jobs/job-") == 2


def test_keys_page_creates_and_revokes_and_sessions_follow(site):
    client, engine, keys = site
    login(client, keys["admin"])
    token = csrf_of(client.get("/ui/keys").text)
    made = client.post("/ui/keys", data={"name": "ci", "scopes": ["read", "write"], "csrf": token})
    new_key = re.search(r'id="new-key">([^<]+)<', made.text).group(1)
    assert auth.verify(engine, new_key).scopes == frozenset({"read", "write"})
    user = TestClient(client.app, base_url="http://127.0.0.1:8000", follow_redirects=False)
    login(user, new_key)
    assert user.get("/ui/").status_code == 200
    key_id = new_key.split("-")[1]
    assert client.post(f"/ui/keys/{key_id}/revoke", data={"csrf": token}).status_code == 303
    time.sleep(2.1)  # the key cache's ttl
    assert user.get("/ui/").status_code == 303  # a revoked key's session is logged out
    # logout ends the session
    assert client.post("/ui/logout", data={"csrf": token}).status_code == 303
    assert client.get("/ui/").status_code == 303


def test_open_mode_logs_in_without_a_key_on_loopback_only(tmp_path):
    app = create_app(Settings(data_dir=tmp_path / "data"))
    local = TestClient(app, base_url="http://127.0.0.1:8000", follow_redirects=False, client=("127.0.0.1", 5000))
    assert "log in with an empty key" in local.get("/ui/login").text
    assert login(local, "").status_code == 303 and local.get("/ui/").status_code == 200
    remote = TestClient(app, base_url="http://127.0.0.1:8000", follow_redirects=False, client=("10.1.2.3", 5000))
    assert login(remote, "").status_code == 401 and remote.get("/ui/").status_code == 303


# ----------------------------------------------------------------------------------------------------------------
# In Chromium, end to end
# ----------------------------------------------------------------------------------------------------------------

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# the job page's live state: status, stage, progress bar, whether the learning curves show, whether the report does
LIVE_STATE = """(() => { const q = (s) => document.querySelector(s); if (!q('#status')) return null;
  return [q('#status').textContent, q('#stage').textContent, q('#progress').value, q('#progress').max,
          !q('#curves-section').hidden && q('#curves').complete && q('#curves').naturalWidth > 0, !!q('#report')]; })()"""
# the default recipe with tiny models, but small batches (more steps than the API test's) so that each training
# stage lasts a few seconds and its progress can be watched
RECIPE = {
    **{k: v for k, v in TINY_RECIPE.items() if k not in ("epochs", "teacher_epochs")},
    "train_size": 2000,
    "teacher_train": {"epochs": 5, "batch_size": 8},
    "student_train": {"epochs": 5, "batch_size": 8},
}


def _above(fd: int, least: int) -> int:
    """The file `fd` under a number at least `least` (the original closed)."""
    moved = fcntl.fcntl(fd, fcntl.F_DUPFD, least)
    os.close(fd)
    return moved


class Chromium:
    """Headless Chromium driven over the DevTools protocol on a pipe (`--remote-debugging-pipe`: JSON messages ending
    in NUL on file descriptors 3 and 4), so neither a websocket library nor a browser download is needed."""

    def __init__(self, binary: str, profile: Path, log: Path) -> None:
        to_browser, self._write = os.pipe()
        self._read, from_browser = os.pipe()
        # above 4, so that `3<&N 4>&M` cannot overwrite one before it is copied (bash: dash takes fds 0-9 only)
        to_browser, from_browser = (_above(fd, 10) for fd in (to_browser, from_browser))
        args = ["--headless", "--no-sandbox", "--disable-gpu", "--remote-debugging-pipe", "--no-first-run",
                f"--user-data-dir={profile}", "--window-size=1280,1000", "about:blank"]  # fmt: skip
        self.process = subprocess.Popen(
            ["bash", "-c", f'exec "$0" "$@" 3<&{to_browser} 4>&{from_browser}', binary, *args],
            pass_fds=(to_browser, from_browser),
            stdout=log.open("ab"),
            stderr=subprocess.STDOUT,
        )
        os.close(to_browser)
        os.close(from_browser)
        self._next, self._replies, self._lock = 0, {}, threading.Condition()
        threading.Thread(target=self._reader, daemon=True).start()
        targets = self.send("Target.getTargets")["targetInfos"]
        page = next(t for t in targets if t["type"] == "page")
        self.session = self.send("Target.attachToTarget", targetId=page["targetId"], flatten=True)["sessionId"]
        self.send("Emulation.setDeviceMetricsOverride", width=1280, height=1000, deviceScaleFactor=1, mobile=False,
                  session=True)  # fmt: skip

    def _reader(self) -> None:
        buffer = b""
        while chunk := os.read(self._read, 1 << 16):
            buffer += chunk
            *messages, buffer = buffer.split(b"\0")
            for raw in messages:
                message = json.loads(raw)
                if "id" in message:
                    with self._lock:
                        self._replies[message["id"]] = message
                        self._lock.notify_all()

    def send(self, method: str, session: bool = False, timeout: float = 30, **params: Any) -> dict[str, Any]:
        with self._lock:
            self._next += 1
            number = self._next
        message: dict[str, Any] = {"id": number, "method": method, "params": params}
        if session:
            message["sessionId"] = self.session
        os.write(self._write, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        with self._lock:
            while number not in self._replies:
                if not self._lock.wait(max(0.0, deadline - time.monotonic())):
                    raise AssertionError(f"Chromium did not answer {method} in {timeout} s")
            reply = self._replies.pop(number)
        if "error" in reply:
            raise AssertionError(f"{method}: {reply['error']}")
        return reply.get("result", {})  # type: ignore[no-any-return]

    def js(self, expression: str) -> Any:
        result = self.send("Runtime.evaluate", session=True, expression=expression, returnByValue=True)
        if "exceptionDetails" in result:
            raise AssertionError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait(self, expression: str, timeout: float = 30) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                value = self.js(expression)
            except AssertionError:  # the page is navigating: its context is gone for a moment
                value = None
            if value:
                return value
            time.sleep(0.2)
        raise AssertionError(f"still false after {timeout} s: {expression}; at {self.js('location.href')}")

    def goto(self, url: str) -> None:
        self.js("window.__old = true")
        self.send("Page.navigate", session=True, url=url)
        self.wait("window.__old === undefined && document.readyState === 'complete'")

    def submit(self, form_selector: str) -> None:
        """Submit a form as a click on its button would, then wait for the next page to load."""
        self.js(f"window.__old = true; document.querySelector({json.dumps(form_selector)}).requestSubmit()")
        self.wait("window.__old === undefined && document.readyState === 'complete'")

    def screenshot(self, path: Path) -> None:
        data = self.send("Page.captureScreenshot", session=True, format="png", captureBeyondViewport=True)["data"]
        path.write_bytes(base64.b64decode(data))

    def close(self) -> None:
        with contextlib.suppress(AssertionError, OSError):
            self.send("Browser.close", timeout=5)
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        os.close(self._write)


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (`.ci/run` installs it)")
def test_dashboard_in_chromium(tmp_path):
    artifacts = Path(os.environ.get("DISTILL_TEST_ARTIFACTS", tmp_path / "screenshots"))
    artifacts.mkdir(parents=True, exist_ok=True)
    print(f"\nscreenshots in {artifacts}")
    data = tmp_path / "data"
    made = distill_cli("service", "keys", "create", "--scopes", "admin", "--data-dir", data)
    assert made.returncode == 0, made.stderr
    key = made.stdout.strip()
    service = worker = browser = None
    try:
        service = Service(data).start()
        worker = Worker(data, name="ui", lease=10)
        assert CHROMIUM is not None
        browser = Chromium(CHROMIUM, tmp_path / "profile", tmp_path / "chromium.log")
        downloads = tmp_path / "downloads"
        browser.send("Browser.setDownloadBehavior", behavior="allow", downloadPath=str(downloads))

        # not logged in: every page leads to the login page
        browser.goto(f"{service.url}/ui/")
        assert browser.wait("location.pathname === '/ui/login' && !!document.querySelector('#login')")
        browser.screenshot(artifacts / "1-login.png")
        browser.js(f"document.querySelector('#key').value = {json.dumps(key)}")
        browser.submit("#login")
        assert browser.js("location.pathname") == "/ui/"
        assert browser.js("document.cookie") == ""  # the session cookie is HttpOnly: scripts cannot read it

        # the default recipe from the form, with tiny settings and a name with HTML in it
        browser.goto(f"{service.url}/ui/jobs/new")
        browser.js(f"document.querySelector('#name').value = {json.dumps(XSS)}")
        browser.js(f"document.querySelector('#config').value = {json.dumps(json.dumps(RECIPE, indent=2))}")
        browser.submit("#new-job")
        assert browser.js("location.pathname").startswith("/ui/jobs/job-")
        job_id = browser.js("document.querySelector('#job').dataset.job")
        assert browser.js("document.querySelector('#job-name').textContent") == XSS  # shown as text
        assert browser.js("document.querySelectorAll('#job-name script').length") == 0

        # live progress: the event stream moves the stage and the progress bar and redraws the learning curves; the
        # running page is shot once a student trains (the teacher's curves are up by then)
        seen, shot, deadline = [], False, time.monotonic() + 300
        while time.monotonic() < deadline:
            try:
                state = browser.js(LIVE_STATE)
            except AssertionError:  # the page is reloading
                continue
            if state and state[5]:  # reloaded with the report
                break
            if state and state not in seen:
                seen.append(state)
            if not shot and state and state[0] == "running" and state[1].startswith("student") and state[4]:
                browser.screenshot(artifacts / "2-job-running.png")
                shot = True
            time.sleep(0.1)
        stages = [s[1] for s in seen if s[0] == "running"]
        assert any(s.startswith("teacher") for s in stages) and any(s.startswith("student") for s in stages), seen
        assert any(0 < s[2] < s[3] for s in seen), seen  # the bar was part-way at some point
        assert shot, seen
        # the end: the page reloads with the report, its plots and the downloads
        browser.wait("!!document.querySelector('#report') && !!document.querySelector('#artifacts')")
        assert browser.js("document.querySelector('#status').textContent") == "succeeded"
        assert browser.js("document.querySelector('#progress').value") == browser.js(
            "document.querySelector('#progress').max"
        )
        browser.wait("[...document.images].every(i => i.complete && i.naturalWidth > 0)")
        plotted = browser.js("[...document.querySelectorAll('#report img.plot')].map(i => i.alt)")
        assert {"accuracy_vs_params.png", "reliability.png"} <= set(plotted)
        assert "Teacher vs student" in browser.js("document.querySelector('#report').textContent")
        browser.screenshot(artifacts / "3-job-report.png")

        # download the student from the page
        browser.js("document.querySelector('a[href$=\"student/model.safetensors\"]').click()")
        target = downloads / "model.safetensors"
        deadline = time.monotonic() + 60
        while not target.is_file() and time.monotonic() < deadline:
            time.sleep(0.2)
        with service.client(key) as http:
            manifest = {a["path"]: a for a in http.get(f"/v1/jobs/{job_id}/artifacts").json()["data"]}
        assert hashlib.sha256(target.read_bytes()).hexdigest() == manifest["student/model.safetensors"]["sha256"]

        # the job list (escaped name, key figures) and the comparison chart
        browser.goto(f"{service.url}/ui/")
        assert XSS in browser.js("document.querySelector('#jobs').textContent")
        assert browser.js("document.querySelectorAll('#jobs script').length") == 0
        browser.screenshot(artifacts / "4-jobs.png")
        browser.goto(f"{service.url}/ui/compare?job={job_id}")
        browser.wait("document.querySelector('#chart').naturalWidth > 0")
        browser.screenshot(artifacts / "5-compare.png")
        browser.goto(f"{service.url}/ui/keys")
        browser.screenshot(artifacts / "6-keys.png")

        # logging out: back to the login page only
        browser.submit("header form")
        browser.goto(f"{service.url}/ui/jobs/{job_id}")
        assert browser.wait("location.pathname === '/ui/login'")
    finally:
        if browser is not None:
            browser.close()
        stop_all(worker, service)
    for name in ("1-login", "2-job-running", "3-job-report", "4-jobs", "5-compare", "6-keys"):
        assert (artifacts / f"{name}.png").stat().st_size > 1000
