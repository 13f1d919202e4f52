"""LM cascades: the confidence of an answer, the threshold curve, the choice on a validation file, and the cascade
served by `distill serve` (a tiny random GPT-2 student, a fake teacher endpoint in-process)."""

from __future__ import annotations

import json
import math
from statistics import NormalDist

import httpx
import pytest
import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi.testclient import TestClient

from conftest import tiny_gpt2
from distill import cascade_curve
from distill.engine import Engine
from distill.errors import DataError
from distill.hf import load_causal_lm, load_tokenizer
from distill.lm_confidence import ConfidenceConfig, agreement, confidence, mean_logprob, same_answer, well_formed
from distill.serve import CascadeSetup, TeacherEndpoint, create_app
from distill.serve.calibrate import Answered, answer, judge, read_validation

torch.set_num_threads(1)
PROMPTS = ["the movie was", "i love this film and the acting"]
TEACHER_TEXT = "the teacher says 42"
GREEDY = {"temperature": 0, "max_tokens": 6}


# ----------------------------------------------------------------------------------------------------------------
# A fake teacher endpoint (in-process, through httpx.ASGITransport)
# ----------------------------------------------------------------------------------------------------------------


def fake_teacher() -> tuple[FastAPI, dict]:
    """An OpenAI-compatible teacher answering TEACHER_TEXT (choice i of prompt p: "... p i"); `state["fail"]` set to
    a status makes it fail; `state["requests"]` keeps the bodies it got."""
    state: dict = {"requests": [], "fail": None}
    app = FastAPI()

    def answer_of(body: dict, chat: bool) -> tuple[list[dict], dict]:
        prompts = [None] if chat else body["prompt"] if isinstance(body["prompt"], list) else [body["prompt"]]
        n = body.get("n") or 1
        choices = []
        for p in range(len(prompts)):
            for i in range(n):
                text = TEACHER_TEXT if (p, i) == (0, 0) else f"{TEACHER_TEXT} {p} {i}"
                content = {"message": {"role": "assistant", "content": text}} if chat else {"text": text}
                choices.append({"index": p * n + i, **content, "finish_reason": "stop", "logprobs": None})
        return choices, {
            "prompt_tokens": 3,
            "completion_tokens": 5 * len(choices),
            "total_tokens": 3 + 5 * len(choices),
        }

    async def respond(request: Request, chat: bool):
        body = await request.json()
        state["requests"].append(body)
        if state["fail"]:
            return JSONResponse({"error": {"message": "the teacher is down"}}, status_code=state["fail"])
        choices, usage = answer_of(body, chat)
        if not body.get("stream"):
            return {"id": "x", "object": "chat.completion" if chat else "text_completion", "choices": choices,
                    "usage": usage}  # fmt: skip

        def events():
            for choice in choices:
                if chat:
                    delta = {"index": choice["index"], "delta": {"content": choice["message"]["content"]},
                             "finish_reason": "stop"}  # fmt: skip
                else:
                    delta = choice
                yield f"data: {json.dumps({'id': 'x', 'choices': [delta]})}\n\n"
            if (body.get("stream_options") or {}).get("include_usage"):
                yield f"data: {json.dumps({'id': 'x', 'choices': [], 'usage': usage})}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await respond(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await respond(request, chat=True)

    return app, state


def endpoint(app: FastAPI) -> TeacherEndpoint:
    return TeacherEndpoint("http://teacher.test/v1", "big", transport=httpx.ASGITransport(app=app))


@pytest.fixture(scope="module")
def student_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("cascade") / "student"
    tiny_gpt2(directory)
    return directory


@pytest.fixture(scope="module")
def confidences(student_dir) -> list[float]:
    """The student's greedy confidence (mean token log-prob) in its answer to each of PROMPTS."""
    engine = Engine(load_causal_lm(student_dir), load_tokenizer(student_dir))
    found = answer(engine, [engine.encode(p) for p in PROMPTS], ConfidenceConfig(), GREEDY["max_tokens"])
    assert found[0].confidence != found[1].confidence
    return [a.confidence for a in found]


def served(student_dir, teacher: FastAPI, threshold: float) -> TestClient:
    setup = CascadeSetup(teacher=endpoint(teacher), threshold=threshold)
    return TestClient(create_app(student_dir, model_name="tiny", batch_wait_ms=1, cascade=setup))


def sse(response) -> list:
    lines = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
    return [line if line == "[DONE]" else json.loads(line) for line in lines]


# ----------------------------------------------------------------------------------------------------------------
# Confidence and the curve
# ----------------------------------------------------------------------------------------------------------------


def test_confidence_measures():
    assert mean_logprob([-1.0, -3.0]) == -2.0 and mean_logprob([]) == -9999.0
    assert well_formed("2 + 3 = 5\n#### 5\n") and well_formed("#### -1,234.5")
    assert not well_formed("2 + 3 = 5") and not well_formed("#### five") and not well_formed("#### 5\nmore text")
    assert same_answer("so 2 + 3 = 5\n#### 5", "5", "final") and not same_answer("#### 6", "#### 5", "final")
    assert same_answer(" a  b ", "a b", "text") and not same_answer("a b", "a b c", "text")
    assert agreement("#### 5", ["x #### 5", "#### 5.0", "#### 4", "none"], "final") == 0.5
    config = ConfidenceConfig(answers="final", verify=True)
    assert confidence(config, "no answer line", [-0.1], []) == -math.inf
    assert confidence(config, "#### 5", [-0.5, -1.5], []) == -1.0
    voted = ConfidenceConfig(measure="agreement", samples=2, answers="final")
    assert confidence(voted, "#### 5", [], ["#### 5", "#### 4"]) == 0.5
    with pytest.raises(ValueError, match="answers to final"):
        ConfidenceConfig(verify=True)


def brute_force(confidence, student_ok, teacher_ok, target, assurance):
    """Every threshold tried: the lowest whose lower bound of score - target x teacher's score (the paired normal
    bound at level `assurance`, sample standard deviation) reaches 0, never keeping a -inf row."""
    z, n, best = NormalDist().inv_cdf(assurance), confidence.numel(), math.inf
    for t in sorted({*confidence.tolist(), math.inf}):
        keep = confidence >= t
        if bool((keep & torch.isinf(confidence) & (confidence < 0)).any()):
            continue
        d = torch.where(keep, student_ok.double(), teacher_ok.double()) - target * teacher_ok.double()  # (N,)
        if float(d.mean()) - z * float(d.std()) / math.sqrt(n) >= -1e-12:
            best = min(best, t)
    return best


@pytest.mark.parametrize("assurance", [0.5, 0.8, 0.95])
def test_choose_matches_brute_force_with_gold_answers_and_refused_rows(assurance):
    generator = torch.Generator().manual_seed(0)
    for _ in range(60):
        confidence = (torch.randint(0, 6, (30,), generator=generator).double() - 6) / 2  # ties
        confidence[torch.rand(30, generator=generator) < 0.1] = -math.inf  # refused by the verifier
        student_ok = torch.rand(30, generator=generator) < 0.6
        teacher_ok = torch.rand(30, generator=generator) < 0.85
        target = float(torch.rand(1, generator=generator)) * 0.3 + 0.7
        choice = cascade_curve.choose(confidence, student_ok, teacher_ok, target, assurance)
        expected = brute_force(confidence, student_ok, teacher_ok, target, assurance)
        assert choice.relative >= target - 1e-9 and choice.assurance == assurance
        assert choice.score - choice.margin >= target * choice.teacher_score - 1e-9
        if expected == math.inf:
            assert choice.escalation_rate == 1.0
        else:
            assert choice.threshold == expected
        kept = confidence >= choice.threshold
        assert choice.escalation_rate == pytest.approx(1 - float(kept.double().mean()))
        assert not bool((kept & torch.isinf(confidence)).any())
        points = cascade_curve.curve(confidence, student_ok, teacher_ok)
        assert points[0].escalated == 1.0 and points[0].relative == pytest.approx(1.0)
        assert any(p.threshold == choice.threshold and p.score == choice.score for p in points)


def test_curve_refuses_no_rows():
    with pytest.raises(ValueError, match="no validation rows"):
        cascade_curve.choose(torch.zeros(0), torch.zeros(0, dtype=torch.bool), torch.zeros(0, dtype=torch.bool), 0.9)


# ----------------------------------------------------------------------------------------------------------------
# The cascade served
# ----------------------------------------------------------------------------------------------------------------


def test_below_the_threshold_the_teacher_answers(student_dir):
    teacher, state = fake_teacher()
    with served(student_dir, teacher, threshold=0.5) as client:  # a mean log-prob is never above 0
        chat = client.post("/v1/chat/completions", json={"model": "tiny", "messages": [{"role": "user", "content": "hi"}],
                                                         **GREEDY})  # fmt: skip
        assert chat.status_code == 200, chat.text
        assert chat.headers["X-Distill-Answered-By"] == "teacher"
        (choice,) = chat.json()["choices"]
        assert choice["message"]["content"] == TEACHER_TEXT and choice["answered_by"] == "teacher"
        assert state["requests"][-1]["model"] == "big" and state["requests"][-1]["messages"][0]["content"] == "hi"
        done = client.post("/v1/completions", json={"model": "tiny", "prompt": PROMPTS, "n": 2, **GREEDY})
        assert done.headers["X-Distill-Answered-By"] == "teacher"
        assert [c["index"] for c in done.json()["choices"]] == [0, 1, 2, 3]
        assert {c["answered_by"] for c in done.json()["choices"]} == {"teacher"}
        assert state["requests"][-1]["prompt"] == PROMPTS and state["requests"][-1]["n"] == 2
        live = client.get("/v1/cascade").json()["live"]
        assert live["requests"] == 3 and live["escalated"] == 3 and live["escalation_rate"] == 1.0


def test_above_the_threshold_the_student_answers(student_dir):
    teacher, state = fake_teacher()
    with served(student_dir, teacher, threshold=-10_000.0) as client:  # below any mean log-prob
        chat = client.post("/v1/chat/completions", json={"model": "tiny", "messages": [{"role": "user", "content": "hi"}],
                                                         **GREEDY})  # fmt: skip
        assert chat.headers["X-Distill-Answered-By"] == "student"
        assert chat.json()["choices"][0]["answered_by"] == "student" and "logprobs" in chat.json()["choices"][0]
        assert chat.json()["choices"][0]["logprobs"] is None  # kept for the confidence, shown only when asked
        done = client.post("/v1/completions", json={"model": "tiny", "prompt": PROMPTS, **GREEDY})
        assert done.headers["X-Distill-Answered-By"] == "student" and state["requests"] == []
        live = client.get("/v1/cascade").json()["live"]
        assert live == {"requests": 3, "escalated": 0, "escalation_rate": 0.0, "escalated_agreement": None}


def test_a_request_mixes_confident_and_escalated_prompts(student_dir, confidences):
    teacher, state = fake_teacher()
    middle = sum(confidences) / 2
    low = confidences.index(min(confidences))
    with served(student_dir, teacher, threshold=middle) as client:
        done = client.post("/v1/completions", json={"model": "tiny", "prompt": PROMPTS, "n": 2, **GREEDY})
        assert done.headers["X-Distill-Answered-By"] == "mixed"
        choices = done.json()["choices"]
        assert [c["index"] for c in choices] == [0, 1, 2, 3]
        by = [c["answered_by"] for c in choices]
        assert by[2 * low : 2 * low + 2] == ["teacher", "teacher"] and by.count("student") == 2
        assert choices[2 * low]["text"] == TEACHER_TEXT and choices[2 * low + 1]["text"] == f"{TEACHER_TEXT} 0 1"
        assert state["requests"][-1]["prompt"] == [PROMPTS[low]]  # only the escalated prompt reaches the teacher
        usage = done.json()["usage"]
        assert usage["completion_tokens"] >= 10  # the teacher's 2 x 5 tokens and the student's own
        streamed = client.post("/v1/completions", json={"model": "tiny", "prompt": PROMPTS, "n": 2, "stream": True,
                                                        "stream_options": {"include_usage": True}, **GREEDY})  # fmt: skip
        assert streamed.headers["X-Distill-Answered-By"] == "mixed"
        events = sse(streamed)
        assert events[-1] == "[DONE]" and events[-2]["usage"]["completion_tokens"] == usage["completion_tokens"]
        texts = {c["index"]: c["text"] for e in events[:-2] for c in e["choices"]}
        assert texts == {c["index"]: c["text"] for c in choices}
        assert client.get("/v1/cascade").json()["live"]["escalated"] == 2


def test_streaming_chat_streams_the_student_or_relays_the_teacher(student_dir):
    teacher, _ = fake_teacher()
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "stream": True, **GREEDY}
    with served(student_dir, teacher, threshold=-10_000.0) as client:
        plain = client.post("/v1/chat/completions", json={**body, "stream": False}).json()["choices"][0]
        events = sse(client.post("/v1/chat/completions", json=body))
        text = "".join(c["delta"].get("content", "") for e in events[:-1] for c in e["choices"])
        assert events[-1] == "[DONE]" and text == plain["message"]["content"]
    with served(student_dir, teacher, threshold=0.5) as client:
        response = client.post("/v1/chat/completions", json=body)
        assert response.headers["X-Distill-Answered-By"] == "teacher"
        events = sse(response)
        assert "".join(c["delta"].get("content", "") for e in events[:-1] for c in e["choices"]) == TEACHER_TEXT
        assert all(e["model"] == "tiny" for e in events[:-1])  # relayed as this server's chunks


def test_the_agreement_measure_samples_k_answers_in_the_same_batch(student_dir, monkeypatch):
    from distill.batcher import Batcher

    batches = []
    run = Batcher.run

    async def counted(self, rows):
        batches.append([(row.params.temperature, row.params.top_logprobs) for row in rows])
        return await run(self, rows)

    monkeypatch.setattr(Batcher, "run", counted)
    teacher, state = fake_teacher()
    config = ConfidenceConfig(measure="agreement", samples=3)
    for threshold, by in ((0.0, "student"), (1.01, "teacher")):  # agreement lies in [0, 1]
        setup = CascadeSetup(teacher=endpoint(teacher), confidence=config, threshold=threshold)
        with TestClient(create_app(student_dir, model_name="tiny", batch_wait_ms=1, cascade=setup)) as client:
            done = client.post("/v1/completions", json={"model": "tiny", "prompt": PROMPTS, "seed": 1, **GREEDY})
            assert done.headers["X-Distill-Answered-By"] == by
        # Both prompts' greedy answers (with their log-probs) and 3 samples each at temperature 1, in one call.
        assert sorted(batches[-1]) == [(0.0, 0)] * 2 + [(1.0, None)] * 6
    assert state["requests"][-1]["prompt"] == PROMPTS


def test_a_failing_teacher_is_a_502(student_dir):
    teacher, state = fake_teacher()
    state["fail"] = 500
    with served(student_dir, teacher, threshold=0.5) as client:
        for path, fields in [("chat/completions", {"messages": [{"role": "user", "content": "hi"}]}),
                             ("completions", {"prompt": PROMPTS})]:  # fmt: skip
            for stream in (False, True):
                response = client.post(f"/v1/{path}", json={"model": "tiny", **fields, "stream": stream, **GREEDY})
                assert response.status_code == 502, response.text
                error = response.json()["error"]
                assert error["code"] == "teacher_failed" and "the teacher is down" in error["message"]
    unreachable = TeacherEndpoint("http://127.0.0.1:9/v1", "big", timeout=5)  # port 9: nothing listens
    setup = CascadeSetup(teacher=unreachable, threshold=0.5)
    with TestClient(create_app(student_dir, model_name="tiny", cascade=setup)) as client:
        response = client.post("/v1/completions", json={"model": "tiny", "prompt": "the", **GREEDY})
        assert response.status_code == 502 and "ConnectError" in response.json()["error"]["message"]


# ----------------------------------------------------------------------------------------------------------------
# The threshold chosen on a validation file
# ----------------------------------------------------------------------------------------------------------------


def write_rows(path, rows) -> None:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))


def test_the_threshold_is_chosen_on_a_validation_file(student_dir, tmp_path):
    teacher, state = fake_teacher()
    engine = Engine(load_causal_lm(student_dir), load_tokenizer(student_dir))
    greedy = answer(engine, [engine.encode(p) for p in PROMPTS], ConfidenceConfig(), 16)
    confidences = [a.confidence for a in greedy]
    low = confidences.index(min(confidences))
    # The teacher agrees with the student on its confident prompt only: the target 1.0 sends the other one up.
    rows = [{"prompt": p, "teacher": greedy[i].text if i != low else "something else"} for i, p in enumerate(PROMPTS)]
    write_rows(tmp_path / "val.jsonl", rows)
    seen = []
    setup = CascadeSetup(teacher=endpoint(teacher), validation=tmp_path / "val.jsonl", target=1.0, max_tokens=16,
                         on_calibrated=seen.append)  # fmt: skip
    with TestClient(create_app(student_dir, model_name="tiny", cascade=setup)) as client:
        (calibration,) = seen
        assert calibration.reference == "teacher" and state["requests"] == []  # every row had the teacher's answer
        assert calibration.choice.threshold == max(confidences) and calibration.choice.escalation_rate == 0.5
        shown = client.get("/v1/cascade").json()
        assert shown["threshold"] == max(confidences) and shown["validation"]["escalation_rate"] == 0.5
    # Gold answers only: the teacher is asked for its answers, and the cascade is judged by accuracy.
    write_rows(tmp_path / "gold.jsonl", [{"prompt": p, "answer": TEACHER_TEXT} for p in PROMPTS])
    setup = CascadeSetup(teacher=endpoint(teacher), validation=tmp_path / "gold.jsonl", target=1.0, max_tokens=16,
                         on_calibrated=seen.append)  # fmt: skip
    create_app(student_dir, model_name="tiny", cascade=setup)
    assert seen[-1].reference == "gold" and seen[-1].teacher == [TEACHER_TEXT] * 2 and len(state["requests"]) == 2
    assert seen[-1].choice.escalation_rate == 1.0 and seen[-1].choice.teacher_score == 1.0


def test_judge_scores_against_gold_answers():
    student = [Answered("#### 1", -0.1), Answered("#### 2", -0.2), Answered("#### 9", -0.3), Answered("none", -0.4)]
    teacher = ["#### 1", "#### 2", "#### 3", "#### 5"]
    config = ConfidenceConfig(answers="final")
    found = judge(student, teacher, ["1", "2", "3", "4"], config, target=1.0)
    assert found.choice.teacher_score == 0.75 and found.choice.student_score == 0.5
    assert found.choice.escalation_rate == 0.5 and found.choice.threshold == pytest.approx(-0.2)  # 3/4 = teacher's
    relative = judge(student, teacher, [None, "2", "3", "4"], config, target=0.5, assurance=0.5)  # point estimate
    assert relative.reference == "teacher" and relative.choice.escalation_rate == 0.0  # 2/4 agree with the teacher
    assured = judge(student, teacher, [None, "2", "3", "4"], config, target=0.5)  # 4 rows assure little at 95 %
    assert assured.choice.escalation_rate == 0.5 and assured.choice.margin == 0.0  # the 2 kept rows agree


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        ([], "holds no validation rows"),
        (["", "  "], "holds no validation rows"),
        (['{"prompt": "a"}', "{not json"], "line 2 of .* is not valid JSON"),
        (["[1, 2]"], "line 1 of .* is not a JSON object"),
        (['{"prompt": "a", "question": "b"}'], "unknown key 'question'"),
        (['{"answer": "4"}'], "exactly one of prompt"),
        (['{"prompt": "a", "messages": []}'], "exactly one of prompt"),
        (['{"messages": [{"role": "robot", "content": "x"}]}'], "messages.0.role"),
        (['{"prompt": ["a"]}'], "prompt must be a string"),
        (['{"prompt": ""}'], "prompt is empty"),
        (['{"prompt": "a", "teacher": {"text": "b"}}'], "teacher must be a string"),
    ],
)
def test_hostile_validation_files_are_refused_clearly(tmp_path, lines, message):
    path = tmp_path / "val.jsonl"
    path.write_text("\n".join(lines))
    with pytest.raises(DataError, match=message):
        read_validation(path)


def test_a_failing_teacher_during_calibration_is_a_clear_error(student_dir, tmp_path):
    from distill.errors import DistillError

    teacher, state = fake_teacher()
    state["fail"] = 503
    write_rows(tmp_path / "val.jsonl", [{"prompt": PROMPTS[0]}])
    setup = CascadeSetup(teacher=endpoint(teacher), validation=tmp_path / "val.jsonl", max_tokens=4)
    with pytest.raises(DistillError, match="failed after"):
        create_app(student_dir, model_name="tiny", cascade=setup)


# ----------------------------------------------------------------------------------------------------------------
# The service's deployments of LM students
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    pytest.importorskip("sqlalchemy")
    from _service import finished_job
    from distill.service.app import create_app as service_app
    from distill.service.settings import Settings

    data = tmp_path_factory.mktemp("lm-service") / "data"
    app = service_app(Settings(data_dir=data))  # creates the store
    job, output = finished_job(data, {"recipe": "reasoning"}, "tiny-reasoning")
    tiny_gpt2(output / "models" / "student-traces", seed=1)
    tiny_gpt2(output / "models" / "teacher", layers=3, seed=2)
    with TestClient(app, base_url="http://127.0.0.1:8000", client=("127.0.0.1", 5000)) as client:
        yield client, job


def upload(client, rows) -> str:
    content = "".join(json.dumps(r) + "\n" for r in rows).encode()
    response = client.post("/v1/files", files={"file": ("val.jsonl", content)}, data={"purpose": "validation"})
    assert response.status_code in (200, 201), response.text
    return response.json()["id"]


def test_a_service_deployment_of_an_lm_student(service):
    client, job = service
    teacher = client.post("/v1/completions", json={"model": f"{job}/teacher", "prompt": PROMPTS, **GREEDY}).json()
    teacher_texts = [c["text"] for c in teacher["choices"]]
    # The file's teacher answers are never the student's: the target 1.0 escalates every prompt.
    file_id = upload(
        client, [{"prompt": p, "teacher": f"not what the student writes {i}"} for i, p in enumerate(PROMPTS)]
    )
    body = {"name": "reasoning-cascade", "student": f"{job}/student-traces", "validation": file_id,
            "target_agreement": 1.0, "max_tokens": GREEDY["max_tokens"]}  # fmt: skip
    created = client.post("/v1/deployments", json=body)
    assert created.status_code == 201, created.text
    shown = created.json()
    assert shown["model_type"] == "lm" and shown["student"] == f"{job}/student-traces"
    assert shown["teacher"] == {"model": f"{job}/teacher", "endpoint": None}
    assert shown["validation"]["escalation_rate"] == 1.0 and shown["validation"]["rows"] == 2
    assert shown["validation"]["reference"] == "teacher" and shown["confidence"]["measure"] == "logprob"
    models = client.get("/v1/models").json()["data"]
    assert next(m for m in models if m["id"] == "reasoning-cascade")["kind"] == "cascade"
    answer = client.post("/v1/completions", json={"model": "reasoning-cascade", "prompt": PROMPTS[1], **GREEDY})
    assert answer.status_code == 200, answer.text
    assert answer.headers["X-Distill-Answered-By"] == "teacher"
    assert answer.json()["choices"][0]["text"] == teacher_texts[1]  # the job's teacher, served by the service
    streamed = client.post("/v1/completions", json={"model": "reasoning-cascade", "prompt": PROMPTS[0],
                                                    "stream": True, **GREEDY})  # fmt: skip
    assert streamed.headers["X-Distill-Answered-By"] == "teacher"
    events = sse(streamed)
    assert events[-1] == "[DONE]" and "".join(c["text"] for e in events[:-1] for c in e["choices"]) == teacher_texts[0]
    live = client.get("/v1/deployments/reasoning-cascade").json()["live"]
    assert live["requests"] == 2 and live["escalated"] == 2 and live["escalation_rate"] == 1.0
    assert live["escalated_agreement"] is not None
    # No teacher answers in the file: the service's teacher writes them, and (these tiny random models both repeat
    # the prompt's last word) the student agrees with every one, so it answers everything.
    asked = upload(client, [{"prompt": p} for p in PROMPTS])
    keep = client.post("/v1/deployments", json=body | {"name": "student-first", "validation": asked})
    assert keep.status_code == 201 and keep.json()["validation"]["escalation_rate"] == 0.0
    same = client.post("/v1/completions", json={"model": "student-first", "prompt": PROMPTS[1], **GREEDY})
    assert same.headers["X-Distill-Answered-By"] == "student"
    assert client.get("/v1/deployments/student-first").json()["live"] == {
        "requests": 1, "escalated": 0, "escalation_rate": 0.0, "escalated_agreement": None}  # fmt: skip
    assert client.delete("/v1/deployments/student-first").status_code == 200
    assert client.post("/v1/completions", json={"model": "student-first", "prompt": "the"}).status_code == 404


def test_hostile_lm_deployments_are_refused(service):
    client, job = service
    good = upload(client, [{"prompt": PROMPTS[0], "answer": "4"}])
    base = {"name": "bad", "student": f"{job}/student-traces", "validation": good}
    cases = [
        ({"validation": upload(client, [{"prompt": PROMPTS[0]}, {"nothing": 1}])}, 422, "line 2 of file-"),
        ({"validation": None}, 422, "needs an uploaded validation file"),
        ({"teacher": f"{job}/nothing"}, 422, "has no model nothing"),
        ({"teacher_endpoint": "elsewhere", "teacher": "big"}, 422, "no teacher endpoint named 'elsewhere'"),
        ({"confidence": {"measure": "vibes"}}, 422, "confidence.measure"),
        ({"student": f"{job}/nothing"}, 422, "LM students only"),
        ({"max_tokens": 10**6}, 422, "max_tokens: at most"),
    ]
    for change, status, message in cases:
        response = client.post("/v1/deployments", json=base | change)
        assert response.status_code == status, (change, response.text)
        assert message in response.json()["error"]["message"], (change, response.text)
        assert "/tmp" not in response.text  # the server's paths are not shown


# ----------------------------------------------------------------------------------------------------------------
# distill serve --teacher-url
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--threshold", "-1"], "give the teacher's --teacher-url"),
        (["--teacher-url", "http://127.0.0.1:9/v1"], "needs --teacher-model"),
        (["--teacher-url", "http://127.0.0.1:9/v1", "--teacher-model", "t"], "--threshold T or --validation"),
        (["--teacher-url", "ftp://x", "--teacher-model", "t", "--threshold", "-1"], "http:// or https://"),
        (["--teacher-url", "http://x/v1", "--teacher-model", "t", "--threshold", "nan"], "finite"),
        (["--teacher-url", "http://x/v1", "--teacher-model", "t", "--validation", "nowhere.jsonl"], "is not a file"),
        (
            ["--teacher-url", "http://x/v1", "--teacher-model", "t", "--threshold", "-1", "--confidence", "vibes"],
            "--confidence takes",
        ),
        (["--teacher-url", "http://x/v1", "--teacher-model", "t", "--threshold", "-1", "--verify"], "--answers final"),
        (["--teacher-url", "http://x/v1", "--teacher-model", "t", "--threshold", "-1", "--target", "1.5"], "--target"),
        (
            ["--teacher-url", "http://x/v1", "--teacher-model", "t", "--threshold", "-1", "--assurance", "1"],
            "--assurance must lie",
        ),  # fmt: skip
        (["--assurance", "0.9"], "give the teacher's --teacher-url"),
    ],
)
def test_serve_cascade_options_that_do_not_fit_get_one_line(student_dir, monkeypatch, capsys, args, fragment):
    import sys

    from distill import cli

    monkeypatch.setattr(sys, "argv", ["distill", "serve", "--model", str(student_dir), *args])
    with pytest.raises(SystemExit) as exited:
        cli.main()
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert exited.value.code == 2 and len(lines) == 1 and lines[0].startswith("error:"), lines
    assert fragment in lines[0]


def test_distill_serve_chooses_the_threshold_and_escalates(student_dir, tmp_path):
    """The command end to end: the fake OpenAI server (a child process) is the teacher; the validation rows carry
    gold answers only, so the teacher is asked for its answers at start-up."""
    import os
    import subprocess
    import sys
    import time

    from _fake_openai import fake_openai
    from _service import free_port

    write_rows(tmp_path / "val.jsonl", [{"prompt": f"{p} 2 + 3", "answer": "5"} for p in PROMPTS])
    port = free_port()
    with fake_openai() as teacher:
        command = [sys.executable, "-m", "distill.cli", "serve", "--model", str(student_dir), "--port", str(port),
                   "--teacher-url", teacher.url, "--teacher-model", "fake", "--validation", str(tmp_path / "val.jsonl"),
                   "--answers", "final", "--target", "1", "--validation-max-tokens", "40"]  # fmt: skip
        env = {**os.environ, "OMP_NUM_THREADS": "1", "DISTILL_CACHE": str(tmp_path / ".cache")}
        process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            deadline = time.monotonic() + 90
            while True:
                assert process.poll() is None, process.stderr.read() if process.stderr else ""
                try:
                    httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=1)
                    break
                except httpx.TransportError:
                    assert time.monotonic() < deadline, "distill serve did not start within 90 s"
                    time.sleep(0.2)
            shown = httpx.get(f"http://127.0.0.1:{port}/v1/cascade").json()
            assert shown["validation"]["reference"] == "gold" and shown["validation"]["teacher_score"] == 1.0
            assert shown["validation"]["escalation_rate"] == 1.0  # the random student never writes "#### 5"
            reply = httpx.post(f"http://127.0.0.1:{port}/v1/completions", timeout=30,
                               json={"model": "student", "prompt": "what is 20 + 22?", "max_tokens": 40})  # fmt: skip
            assert reply.headers["X-Distill-Answered-By"] == "teacher" and reply.json()["choices"][0]["text"].endswith(
                "#### 42"
            )
        finally:
            process.terminate()
            stderr = process.communicate(timeout=30)[1]
    assert "cascade: threshold" in stderr and "2 validation rows (accuracy against the gold answers)" in stderr


def test_a_service_deployment_escalating_to_a_configured_endpoint(tmp_path):
    """The teacher at one of the service's DISTILL_TEACHERS endpoints: the fake OpenAI server, and one that is not
    there (a 502 when the deployment is created)."""
    pytest.importorskip("sqlalchemy")
    from _fake_openai import fake_openai
    from _service import finished_job
    from distill.service.app import create_app as service_app
    from distill.service.settings import Settings

    with fake_openai() as remote:
        teachers = {"remote": (remote.url, None), "gone": ("http://127.0.0.1:9/v1", None)}
        app = service_app(Settings(data_dir=tmp_path / "data", teachers=teachers))
        job, output = finished_job(tmp_path / "data", {"recipe": "reasoning"}, "tiny-reasoning")
        tiny_gpt2(output / "student", seed=1)
        with TestClient(app, base_url="http://127.0.0.1:8000", client=("127.0.0.1", 5000)) as client:
            file_id = upload(client, [{"prompt": f"{p} 2 + 3", "answer": "5"} for p in PROMPTS])
            body = {"name": "remote-cascade", "student": job, "validation": file_id, "teacher_endpoint": "remote",
                    "teacher": "fake", "confidence": {"answers": "final"}, "target_agreement": 1.0,
                    "max_tokens": 40}  # fmt: skip
            sure = client.post("/v1/deployments", json=body | {"assurance": 1})
            assert sure.status_code == 422 and "assurance" in sure.text, sure.text
            gone = client.post("/v1/deployments", json=body | {"teacher_endpoint": "gone"})
            assert gone.status_code == 502 and gone.json()["error"]["code"] == "teacher_failed", gone.text
            created = client.post("/v1/deployments", json=body)
            assert created.status_code == 201, created.text
            shown = created.json()
            assert shown["teacher"] == {"model": "fake", "endpoint": "remote"}
            assert shown["validation"]["reference"] == "gold" and shown["validation"]["teacher_score"] == 1.0
            assert shown["validation"]["assurance"] == 0.95 and shown["validation"]["margin"] >= 0
            reply = client.post(
                "/v1/completions", json={"model": "remote-cascade", "prompt": "20 + 22", "max_tokens": 40}
            )
            assert reply.headers["X-Distill-Answered-By"] == "teacher"
            assert reply.json()["choices"][0]["text"].endswith("#### 42")
            assert client.get("/v1/deployments/remote-cascade").json()["live"]["escalated"] == 1
