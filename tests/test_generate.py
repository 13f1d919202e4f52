"""generate(): sampling a teacher into a resumable JSONL file, against the fault-injecting loopback server."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections import Counter
from pathlib import Path

import pytest

from _fake_openai import fake_openai
from distill.errors import DataError, DistillError
from distill.generate import PromptRecord, RequestParams, apply_template, generate, read_prompts
from distill.generate.answers import read_done
from distill.generate.client import Prices, TeacherClient, TeacherClientError
from distill.progress import RecordingReporter

SRC = Path(__file__).resolve().parents[1] / "src"


@pytest.fixture(scope="module")
def server():
    with fake_openai() as running:
        yield running


def questions(count: int) -> list[PromptRecord]:
    return [PromptRecord(prompt=f"what is {i} + {2 * i} ?", gold=str(3 * i)) for i in range(count)]


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def teacher(server, **options) -> TeacherClient:
    return TeacherClient(server.url, "fake", backoff=0.001, **options)


def test_read_prompts_accepts_prompts_gsm8k_and_conversations(tmp_path):
    path = tmp_path / "prompts.jsonl"
    lines = [
        {"prompt": "hi", "gold": 4},
        {"question": "what is 1 + 1 ?", "answer": "1 + 1 = 2\n#### 2"},
        {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "q"}]},
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "old answer"}]},
    ]
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n\n")
    records = read_prompts(path)
    assert records[0] == PromptRecord(prompt="hi", gold="4")
    assert records[1] == PromptRecord(prompt="what is 1 + 1 ?", gold="1 + 1 = 2\n#### 2")
    assert records[2].messages == (("system", "be brief"), ("user", "q")) and records[2].text == "q"
    assert records[3].messages == (("user", "q"),)
    assert len(read_prompts(path, limit=2)) == 2
    text = tmp_path / "prompts.txt"
    text.write_text("one\n\ntwo\n")
    assert [r.prompt for r in read_prompts(text)] == ["one", "two"]
    path.write_text('{"text": "x"}\n')
    with pytest.raises(DataError, match="line 1 of .*needs a prompt, question or messages key \\(has text\\)"):
        read_prompts(path)
    path.write_text('{"messages": [{"role": "assistant", "content": "x"}]}\n')
    with pytest.raises(DataError, match="end with a user message"):
        read_prompts(path)


def test_writes_n_samples_per_prompt_and_a_rerun_asks_nothing(server, tmp_path):
    server.configure()
    out = tmp_path / "out.jsonl"
    client = teacher(server, prices=Prices(1.0, 4.0), concurrency=4)
    reporter = RecordingReporter()
    summary = generate(questions(20), client, out, n=3, params=RequestParams(seed=1), reporter=reporter)
    written = rows(out)
    assert summary.written == 60 and summary.skipped == 0 and summary.failed == 0 and summary.requests == 20
    assert len(written) == 60 and len({r["id"] for r in written}) == 60
    assert Counter(r["prompt"] for r in written) == Counter({q.prompt: 3 for q in questions(20)})
    assert sorted(r["sample_index"] for r in written) == sorted([0, 1, 2] * 20)
    first = next(r for r in written if r["prompt"] == "what is 4 + 8 ?")
    assert first["gold"] == "12" and first["completion"].endswith("#### 12") and first["model"] == "fake"
    assert first["finish_reason"] == "stop" and "top_logprobs" not in first
    assert summary.cost == pytest.approx(sum(r["usage"]["cost"] for r in written))
    assert summary.cost == pytest.approx((summary.prompt_tokens + 4 * summary.completion_tokens) / 1e6)
    assert summary.rate > 0 and reporter.stages == ["generate"]

    server.configure()
    again = generate(questions(20), teacher(server), out, n=3, params=RequestParams(seed=1))
    assert server.stats()["requests"] == 0
    assert again.written == 0 and again.skipped == 60 and rows(out) == written

    server.configure()
    more = generate(questions(20), teacher(server), out, n=4, params=RequestParams(seed=1))
    assert more.written == 20 and server.stats()["requests"] == 20  # only sample index 3 was missing
    assert {b["n"] for b in server.stats()["bodies"]} == {1} and {b["seed"] for b in server.stats()["bodies"]} == {4}


def test_other_sampling_parameters_make_other_samples(server, tmp_path):
    server.configure()
    out = tmp_path / "out.jsonl"
    generate(questions(3), teacher(server), out, params=RequestParams(temperature=0.7))
    generate(questions(3), teacher(server), out, params=RequestParams(temperature=0.8))
    assert len({r["id"] for r in rows(out)}) == 6
    repeated = generate(questions(3) * 2, teacher(server), tmp_path / "twice.jsonl")
    assert repeated.written == 3 and repeated.skipped == 3


def test_one_sample_per_request_with_seeds(server, tmp_path):
    server.configure()
    out = tmp_path / "out.jsonl"
    summary = generate(questions(4), teacher(server), out, n=3, params=RequestParams(seed=10), samples_per_request=1)
    assert summary.requests == 12
    bodies = server.stats()["bodies"]
    assert {b["n"] for b in bodies} == {1} and sorted({b["seed"] for b in bodies}) == [10, 11, 12]
    texts = [r["completion"] for r in rows(out) if r["prompt"] == "what is 1 + 2 ?"]
    assert len(set(texts)) == 3


def test_a_truncated_file_is_completed_without_duplicates(server, tmp_path):
    server.configure()
    out = tmp_path / "out.jsonl"
    generate(questions(30), teacher(server), out)
    complete = rows(out)
    data = out.read_bytes()
    lines = data.splitlines(keepends=True)
    out.write_bytes(b"".join(lines[:12]) + lines[12][:25])  # 12 whole rows and half a line, as a kill leaves them

    server.configure()
    summary = generate(questions(30), teacher(server), out)
    assert summary.skipped == 12 and summary.written == 18 and server.stats()["requests"] == 18
    again = rows(out)
    assert len(again) == 30 and sorted(r["id"] for r in again) == sorted(r["id"] for r in complete)


def test_a_killed_run_resumes_and_completes(server, tmp_path):
    server.configure(delay=0.1)
    out = tmp_path / "out.jsonl"
    script = textwrap.dedent(
        f"""
        import sys
        sys.path.insert(0, {str(SRC)!r})
        from distill.generate.answers import PromptRecord, RequestParams, generate
        from distill.generate.client import TeacherClient
        prompts = [PromptRecord(prompt=f"what is {{i}} + {{2 * i}} ?", gold=str(3 * i)) for i in range(60)]
        generate(prompts, TeacherClient({server.url!r}, "fake", concurrency=2), {str(out)!r}, n=2,
                 params=RequestParams(seed=1))
        """
    )
    child = subprocess.Popen([sys.executable, "-c", script])
    try:
        deadline = time.monotonic() + 60
        while not (out.exists() and out.read_bytes().count(b"\n") >= 20):
            assert child.poll() is None, "the generating child exited early"
            assert time.monotonic() < deadline, "the generating child wrote too little"
            time.sleep(0.02)
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.wait()
    before = read_done(out)
    assert 20 <= len(before) < 120

    server.configure()
    summary = generate(questions(60), teacher(server), out, n=2, params=RequestParams(seed=1))
    after = rows(out)
    assert len(after) == 120 and len({r["id"] for r in after}) == 120
    assert summary.skipped == len(before) and summary.written == 120 - len(before)
    assert Counter(r["prompt"] for r in after) == Counter({q.prompt: 2 for q in questions(60)})
    assert all(r["completion"].endswith(f"#### {r['gold']}") for r in after)


def test_faults_during_generation_lose_nothing(server, tmp_path):
    server.configure(
        faults=["429", "hang", "malformed"],
        hang=2.0,
        fault_rate=0.3,
        fault_kinds=["429", "500", "502", "malformed", "missing"],
    )
    out = tmp_path / "out.jsonl"
    client = teacher(server, concurrency=8, timeout=1.0, max_retries=10, max_malformed=10)
    summary = generate(questions(50), client, out, n=2)
    assert summary.written == 100 and summary.failed == 0 and summary.retries > 10
    assert len({r["id"] for r in rows(out)}) == 100
    assert summary.retries >= sum(server.stats()["faults"].values())  # more only if a slow machine timed out


def test_requests_that_give_up_are_left_for_a_rerun(server, tmp_path):
    server.configure(faults=["500"] * 3)
    out = tmp_path / "out.jsonl"
    reporter = RecordingReporter()
    summary = generate(questions(10), teacher(server, max_retries=0, concurrency=1), out, n=2, reporter=reporter)
    assert summary.failed == 6 and summary.written == 14
    assert [kind for kind, _ in reporter.events] == ["failed"] * 3
    server.configure()
    rerun = generate(questions(10), teacher(server), out, n=2)
    assert rerun.written == 6 and len({r["id"] for r in rows(out)}) == 20

    server.configure(faults=["500"] * 5)
    with pytest.raises(TeacherClientError, match="3 teacher requests failed for good, so generation stopped"):
        generate(questions(10), teacher(server, max_retries=0, concurrency=1), tmp_path / "b.jsonl", max_failures=2)


def test_a_refused_request_stops_the_run(server, tmp_path):
    server.configure(faults=["403"])
    out = tmp_path / "out.jsonl"
    with pytest.raises(TeacherClientError, match="HTTP 403"):
        generate(questions(10), teacher(server, concurrency=1), out)
    assert server.stats()["requests"] == 1 and out.read_text() == ""


def test_template_and_conversations(server, tmp_path):
    server.configure()
    out = tmp_path / "out.jsonl"
    chat = PromptRecord(messages=(("system", "be brief"), ("user", "what is 5 + 5 ?")), gold="10")
    template = "Solve: {question}\nEnd with \\boxed{} and #### <answer>."
    generate([*questions(2), chat], teacher(server), out, template=template)
    written = {r.get("question"): r for r in rows(out)}
    assert written["what is 1 + 2 ?"]["prompt"] == "Solve: what is 1 + 2 ?\nEnd with \\boxed{} and #### <answer>."
    conversation = written["what is 5 + 5 ?"]
    assert conversation["messages"][0] == {"role": "system", "content": "be brief"}
    assert conversation["messages"][1]["content"].startswith("Solve: what is 5 + 5 ?")
    assert conversation["completion"].endswith("#### 10") and conversation["gold"] == "10"
    with pytest.raises(DistillError, match="must contain '\\{question\\}'"):
        apply_template("no placeholder")


def test_completions_endpoint_keeps_logprobs(server, tmp_path):
    server.configure()
    out = tmp_path / "out.jsonl"
    params = RequestParams(top_logprobs=2, max_tokens=4)
    generate(["tell me a story"], teacher(server), out, n=2, params=params, endpoint="completions")
    written = rows(out)
    assert server.stats()["bodies"][0]["prompt"] == "tell me a story"
    assert all(r["finish_reason"] == "length" and len(r["top_logprobs"]["tokens"]) == 4 for r in written)
    assert all(len(position) == 2 for r in written for position in r["top_logprobs"]["top"])


def test_a_corrupt_line_inside_the_file_is_an_error(tmp_path):
    out = tmp_path / "out.jsonl"
    out.write_text('{"id": "a"}\nnot json\n{"id": "b"}\n')
    with pytest.raises(DataError, match="line 2 of .* is not a sample row"):
        read_done(out)
