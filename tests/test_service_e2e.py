"""The README's walkthrough, end to end on a real service and worker: a key, an upload, the default recipe as a
job, its event stream, the student and report downloaded (Range, sha256), the student queried with the official
`openai` client, a cascade deployment and its statistics."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
from openai import OpenAI

from _service import TINY_RECIPE, Service, Worker, distill_cli, stop_all
from test_service_api import sse


def mnist1d_csv(rows: slice, split: str = "test") -> tuple[bytes, np.ndarray, np.ndarray]:
    from distill.recipes.mnist1d import _standard_split

    x, y, x_test, y_test = _standard_split()
    inputs, labels = (x_test, y_test) if split == "test" else (x, y)
    inputs, labels = inputs[rows], labels[rows]
    header = ",".join([*(f"x{i}" for i in range(inputs.shape[1])), "label"])
    lines = [header] + [",".join([*(f"{v:.6f}" for v in row), str(int(label))]) for row, label in zip(inputs, labels)]
    return ("\n".join(lines) + "\n").encode(), inputs, labels


@pytest.fixture(scope="module")
def walkthrough(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("e2e")
    data = tmp / "data"
    made = distill_cli("service", "keys", "create", "--scopes", "read,write,infer", "--data-dir", data)
    assert made.returncode == 0, made.stderr
    key = made.stdout.strip()
    service = worker = None
    try:
        service = Service(data).start()
        worker = Worker(data, name="worker-1", lease=10)
        yield service, key
    finally:
        stop_all(worker, service)


def test_readme_walkthrough(walkthrough):
    service, key = walkthrough
    with service.client(key, timeout=120) as http:
        # upload data: MNIST-1D signals the cascade will choose its threshold on
        content, signals, labels = mnist1d_csv(slice(0, 400))
        uploaded = http.post("/v1/files", files={"file": ("signals.csv", content)}, data={"purpose": "validation"})
        assert uploaded.status_code == 201, uploaded.text
        assert uploaded.json()["sha256"] == hashlib.sha256(content).hexdigest()

        # start the default recipe as a job (small settings) and watch its events stream until it ends
        job = http.post(
            "/v1/jobs", json={"kind": "recipe", "config": TINY_RECIPE}, headers={"Idempotency-Key": "readme"}
        )
        assert job.status_code == 201, job.text
        jid = job.json()["id"]
        events = sse(http, f"/v1/jobs/{jid}/events?stream=true")
        kinds = [e["event"] for e in events]
        assert kinds[-1] == "end" and json.loads(events[-1]["data"])["status"] == "succeeded", events[-3:]
        assert [int(e["id"]) for e in events[:-1]] == list(range(1, len(events)))
        stages = [json.loads(e["data"])["data"]["name"] for e in events if e["event"] == "stage"]
        assert stages[:2] == ["data", "teacher-0"] and "student-distilled" in stages and stages[-1] == "evaluate"
        assert "epoch" in kinds and "progress" in kinds
        finished = http.get(f"/v1/jobs/{jid}").json()
        assert finished["status"] == "succeeded" and finished["metrics"]["student_distilled"]["accuracy"] > 0

        # download the student (its sha256 from the manifest; a Range request resumes a download) and the report
        manifest = {a["path"]: a for a in http.get(f"/v1/jobs/{jid}/artifacts").json()["data"]}
        assert {"student/model.safetensors", "student/model.json", "report.md", "metrics.json"} <= set(manifest)
        assert not any(path.startswith(("checkpoints/", "cache/")) for path in manifest)
        weights = http.get(f"/v1/jobs/{jid}/artifacts/student/model.safetensors")
        assert hashlib.sha256(weights.content).hexdigest() == manifest["student/model.safetensors"]["sha256"]
        assert weights.headers["x-checksum-sha256"] == manifest["student/model.safetensors"]["sha256"]
        part = http.get(f"/v1/jobs/{jid}/artifacts/student/model.safetensors", headers={"Range": "bytes=100-"})
        assert part.status_code == 206 and part.content == weights.content[100:]
        assert part.headers["content-range"] == f"bytes 100-{len(weights.content) - 1}/{len(weights.content)}"
        beyond = http.get(f"/v1/jobs/{jid}/artifacts/student/model.json", headers={"Range": "bytes=99999-"})
        assert beyond.status_code == 416
        assert http.get(f"/v1/jobs/{jid}/artifacts/../distill.db").status_code == 404
        report = http.get(f"/v1/jobs/{jid}/report").json()
        assert report["metrics"]["recipe"] == "mnist1d" and "history" in report["metrics"]
        assert report["report_md"].startswith("# ")
        assert http.get(f"/v1/jobs/{jid}/report", params={"format": "html"}).text.startswith("<!doctype html>")

        # a cascade: the student answers when confident, else the teacher
        deployment = http.post(
            "/v1/deployments",
            json={
                "name": "mnist1d-cascade",
                "student": jid,
                "target_agreement": 0.9,
                "validation": uploaded.json()["id"],
            },
        )
        assert deployment.status_code == 201, deployment.text
        chosen = deployment.json()["validation"]
        assert chosen["rows"] == 400 and chosen["agreement"] >= 0.9 and 0 <= chosen["escalation_rate"] <= 1
        duplicate = http.post(
            "/v1/deployments", json={"name": "mnist1d-cascade", "student": jid, "validation": uploaded.json()["id"]}
        )
        assert duplicate.status_code == 409

    # query the student with the official openai client
    client = OpenAI(base_url=f"{service.url}/v1", api_key=key)
    assert {jid, "mnist1d-cascade"} <= {m.id for m in client.models.list().data}
    reply = client.chat.completions.create(
        model=jid,
        messages=[{"role": "user", "content": json.dumps(signals[0].tolist())}],
        logprobs=True,
        top_logprobs=3,
    )
    answer = reply.choices[0].message.content
    assert answer in {str(c) for c in range(10)}
    top = reply.choices[0].logprobs.content[0].top_logprobs
    assert len(top) == 3 and top[0].token == answer and top[0].logprob >= top[1].logprob >= top[2].logprob
    streamed = "".join(
        chunk.choices[0].delta.content or ""
        for chunk in client.chat.completions.create(
            model=jid, messages=[{"role": "user", "content": json.dumps(signals[0].tolist())}], stream=True
        )
    )
    assert streamed == answer
    batch = client.completions.create(model=jid, prompt=[json.dumps(s.tolist()) for s in signals[:4]])
    assert len(batch.choices) == 4 and batch.choices[0].text == answer

    answered_by = []
    for signal in signals[:30]:
        raw = client.chat.completions.with_raw_response.create(
            model="mnist1d-cascade", messages=[{"role": "user", "content": json.dumps(signal.tolist())}]
        )
        answered_by.append(raw.headers["x-distill-answered-by"])
        assert raw.parse().choices[0].model_extra["answered_by"] == answered_by[-1]
    assert set(answered_by) <= {"student", "teacher"}
    with service.client(key) as http:
        live = http.get("/v1/deployments/mnist1d-cascade").json()["live"]
    assert live["requests"] == 30 and live["escalated"] == answered_by.count("teacher")
    if live["escalated"]:
        assert 0 <= live["escalated_agreement"] <= 1
    import openai

    with pytest.raises(openai.BadRequestError, match="JSON array of 40"):
        client.chat.completions.create(model=jid, messages=[{"role": "user", "content": "[1, 2, 3]"}])
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="job-" + "9" * 24, messages=[{"role": "user", "content": "[1]"}])
