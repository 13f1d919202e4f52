"""The job kinds besides the default recipe, on one real service and worker: `train` (alone, then distilled from
the first) and `evaluate` on uploaded arrays, a failing job and its retry; a causal LM student served through
distill.serve's engine, `cache-build`, `train-lm` from that cache, `generate` against a configured teacher endpoint;
and (slow) the `lm` recipe as a job."""

from __future__ import annotations

import json

import pytest
from openai import OpenAI

from _fake_openai import fake_openai
from _service import Service, Worker, finished_lm_job, stop_all, wait_status
from test_service_e2e import mnist1d_csv

ROWS = [{"prompt": f"the {noun} was", "completion": f"{adjective} and fun"}
        for noun in ("movie", "film", "story", "plot") for adjective in ("great", "good", "bad", "dull", "funny")]  # fmt: skip


@pytest.fixture(scope="module")
def kinds_service(tmp_path_factory):
    data = tmp_path_factory.mktemp("lm") / "data"
    service = worker = None
    with fake_openai() as teacher_api:
        env = {"DISTILL_TEACHERS": f"fake={teacher_api.url}"}
        try:
            service = Service(data, env=env).start()
            worker = Worker(data, name="lm", lease=10, env=env)
            yield service, finished_lm_job(data)
        finally:
            stop_all(worker, service)


def upload_rows(http, name, rows):
    content = "".join(json.dumps(row) + "\n" for row in rows).encode()
    response = http.post("/v1/files", files={"file": (name, content)}, data={"purpose": "train"})
    assert response.status_code == 201, response.text
    return response.json()["id"]


def finish(http, body):
    job = http.post("/v1/jobs", json=body)
    assert job.status_code == 201, job.text
    done = wait_status(http, job.json()["id"], ("succeeded", "failed"), timeout=300)
    assert done["status"] == "succeeded", done["error"]
    return done


def causal_lm_student_is_served_openai_compatible(kinds_service):
    service, lm_job = kinds_service
    client = OpenAI(base_url=f"{service.url}/v1", api_key="unused-in-open-mode")
    assert lm_job in {m.id for m in client.models.list().data}
    completion = client.completions.create(
        model=lm_job, prompt="the movie was", max_tokens=4, temperature=0, logprobs=2
    )
    assert completion.choices[0].finish_reason in ("length", "stop") and completion.usage.completion_tokens <= 4
    assert len(completion.choices[0].logprobs.top_logprobs[0]) == 2
    chat = client.chat.completions.create(
        model=lm_job, messages=[{"role": "user", "content": "i love this film"}], max_tokens=3, seed=1
    )
    assert chat.choices[0].message.role == "assistant" and chat.usage.completion_tokens <= 3
    pieces = client.chat.completions.create(
        model=lm_job, messages=[{"role": "user", "content": "a dog"}], max_tokens=3, stream=True, seed=1
    )
    assert sum(1 for _ in pieces) >= 2


def cache_build_then_train_lm_from_the_cache(kinds_service):
    service, lm_job = kinds_service
    with service.client(timeout=60) as http:
        data = upload_rows(http, "pairs.jsonl", ROWS)
        cache = finish(
            http, {"kind": "cache-build", "config": {"teacher": lm_job, "data": data, "top_k": 4, "max_length": 32}}
        )
        assert cache["metrics"]["top_k"] == 4 and cache["metrics"]["sequences"] == len(ROWS)
        paths = {a["path"] for a in http.get(f"/v1/jobs/{cache['id']}/artifacts").json()["data"]}
        assert "teacher-cache/manifest.json" in paths
        student = finish(http, {"kind": "train-lm", "config": {
            "student": lm_job, "cache": cache["id"], "data": data, "eval_data": data, "max_length": 32,
            "train": {"epochs": 1, "batch_size": 4, "lr": 0.001, "schedule": "constant", "checkpoint_every": 2},
        }})  # fmt: skip
        assert student["metrics"]["eval"]["perplexity"] > 1
        wrong = http.post(
            "/v1/jobs", json={"kind": "train-lm", "config": {"student": lm_job, "cache": lm_job, "data": data}}
        )
        assert wrong.status_code == 422 and wrong.json()["error"]["param"] == "config.cache"
    client = OpenAI(base_url=f"{service.url}/v1", api_key="x")
    reply = client.completions.create(model=student["id"], prompt="the film was", max_tokens=2, temperature=0)
    assert reply.model == student["id"] and reply.choices[0].finish_reason in ("length", "stop")
    evaluate_lm_student_on_tasks(service, lm_job, student["id"])


def evaluate_lm_student_on_tasks(service, teacher, student):
    """The evaluate kind scores a causal LM student and its teacher on tasks built from uploaded JSONL files
    (lm-evaluation-harness), with the student's retention; the wrong inputs for the model's kind are a 422."""
    choices = [{"query": "the movie was", "choices": ["good", "bad"], "gold": i % 2} for i in range(4)]
    texts = [{"text": "the film was good and the dog runs"} for _ in range(3)]
    with service.client(timeout=60) as http:
        files = {name: upload_rows(http, f"{name}.jsonl", rows) for name, rows in (("mc", choices), ("ppl", texts))}
        tasks = [{"kind": "choice", "data": files["mc"], "name": "mc"}, {"kind": "perplexity", "data": files["ppl"]}]
        done = finish(http, {"kind": "evaluate", "config": {"student": student, "teacher": teacher, "tasks": tasks}})
        evaluation = http.get(f"/v1/jobs/{done['id']}/report").json()["metrics"]["evaluation"]
        assert set(evaluation["scores"]) == {"teacher", "student"}
        assert 0 <= evaluation["scores"]["student"]["mc"]["acc"] <= 1
        assert evaluation["retention"]["student"]["perplexity_1"]["word_perplexity"] > 0
        assert "Task scores" in http.get(f"/v1/jobs/{done['id']}/report", params={"format": "md"}).text
        for config, param in (
            ({"student": student, "data": files["mc"]}, "config.student"),  # an LM is scored on tasks
            ({"student": student, "tasks": tasks, "data": files["mc"]}, "config"),  # not both
            ({"student": student, "tasks": [{"kind": "choice", "data": files["mc"], "name": "Bad Name"}]},
             "config.tasks.0.name"),
        ):  # fmt: skip
            refused = http.post("/v1/jobs", json={"kind": "evaluate", "config": config})
            assert refused.status_code == 422 and refused.json()["error"]["param"] == param, refused.text


def generate_against_a_configured_teacher_endpoint(kinds_service):
    service, _ = kinds_service
    with service.client(timeout=60) as http:
        prompts = upload_rows(
            http, "questions.jsonl", [{"question": f"What is {i} + {i}?", "answer": str(2 * i)} for i in range(6)]
        )
        unknown = http.post(
            "/v1/jobs", json={"kind": "generate", "config": {"api": "openai", "model": "x", "prompts": prompts}}
        )
        assert unknown.status_code == 422 and unknown.json()["error"]["param"] == "config.api"
        done = finish(
            http,
            {"kind": "generate", "config": {"api": "fake", "model": "fake", "prompts": prompts, "n": 2, "cot": True}},
        )
        assert done["metrics"]["written"] == 12 and done["metrics"]["failed"] == 0
        lines = http.get(f"/v1/jobs/{done['id']}/artifacts/generated.jsonl").text.splitlines()
        rows = [json.loads(line) for line in lines]
        assert len(rows) == 12 and all("####" in row["completion"] for row in rows)


def test_job_kinds(kinds_service):
    """One test (a service costs seconds to start): every kind in turn."""
    train_and_evaluate(kinds_service[0])
    causal_lm_student_is_served_openai_compatible(kinds_service)
    cache_build_then_train_lm_from_the_cache(kinds_service)
    generate_against_a_configured_teacher_endpoint(kinds_service)


def train_and_evaluate(service):
    with service.client(timeout=60) as http:
        ids = {}
        for name, rows, split in (("train", slice(0, 600), "train"), ("test", slice(0, 300), "test")):
            content, _, _ = mnist1d_csv(rows, split)
            ids[name] = http.post("/v1/files", files={"file": (f"{name}.csv", content)}).json()["id"]
        fit = {"epochs": 3, "batch_size": 64, "lr": 0.003}
        teacher = http.post("/v1/jobs", json={"kind": "train", "config": {
            "data": {"train": ids["train"], "test": ids["test"]}, "student": {"family": "mlp", "width": 64}, "train": fit,
        }}).json()  # fmt: skip
        assert wait_status(http, teacher["id"], ("succeeded", "failed"))["status"] == "succeeded"
        student = http.post("/v1/jobs", json={"kind": "train", "config": {
            "data": {"train": ids["train"], "test": ids["test"]}, "student": {"family": "mlp", "width": 8, "depth": 1},
            "teacher": teacher["id"], "train": fit,
        }}).json()  # fmt: skip
        done = wait_status(http, student["id"], ("succeeded", "failed"))
        assert done["status"] == "succeeded", done["error"]
        assert done["metrics"]["student_distilled"]["params"] < done["metrics"]["teacher"]["params"]
        scored = http.post("/v1/jobs", json={"kind": "evaluate", "config": {
            "student": student["id"], "teacher": teacher["id"], "data": ids["test"],
        }}).json()  # fmt: skip
        result = wait_status(http, scored["id"], ("succeeded", "failed"))
        assert result["status"] == "succeeded", result["error"]
        metrics = http.get(f"/v1/jobs/{scored['id']}/report").json()["metrics"]
        assert metrics["rows"] == 300 and 0 <= metrics["student"]["agreement"] <= 1
        assert "teacher" in http.get(f"/v1/jobs/{scored['id']}/report", params={"format": "md"}).text
        # a job whose data cannot be read fails with the reason, and a retry runs it again
        bad = http.post("/v1/files", files={"file": ("words.csv", b"a,label\nhello,1\n")}).json()["id"]
        failing = http.post("/v1/jobs", json={"kind": "train", "config": {"data": {"train": bad}}}).json()
        failed = wait_status(http, failing["id"], ("succeeded", "failed"))
        assert failed["status"] == "failed" and "'hello' is not a number" in failed["error"]
        assert http.post(f"/v1/jobs/{failing['id']}/retry").json()["status"] == "queued"
        assert wait_status(http, failing["id"], ("failed",))["attempts"] == 1


@pytest.mark.slow
def test_lm_recipe_job_trains_and_serves_its_student(kinds_service):
    import random

    from conftest import TINY_WORDS

    service, _ = kinds_service
    generator = random.Random(0)
    lines = [" ".join(generator.choice(TINY_WORDS[:50]) for _ in range(generator.randint(4, 10))) for _ in range(800)]
    small = {"epochs": 1, "batch_size": 32, "lr": 0.003}
    with service.client(timeout=60) as http:
        corpus = http.post("/v1/files", files={"file": ("corpus.txt", ("\n".join(lines) + "\n").encode())}).json()["id"]
        job = finish(http, {"kind": "recipe", "config": {
            "recipe": "lm", "corpus": corpus, "vocab_size": 300, "max_length": 16, "top_k": 8,
            "teacher": {"layers": 1, "width": 32, "heads": 2}, "student": {"layers": 1, "width": 16, "heads": 2},
            "teacher_train": small, "student_train": small,
        }})  # fmt: skip
        assert job["metrics"]["models"]["student-distilled"]["perplexity"] > 1
    client = OpenAI(base_url=f"{service.url}/v1", api_key="x")
    for model in (job["id"], f"{job['id']}/teacher"):
        reply = client.completions.create(model=model, prompt="the movie", max_tokens=3, temperature=0)
        assert reply.choices[0].finish_reason in ("length", "stop")
