"""`distill serve`, `distill generate` and `distill traces`, run as a user runs them (subprocesses, real HTTP)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import httpx

from _fake_openai import fake_openai
from test_cli import assert_one_line_error, distill_cli
from test_serve import tiny_chat_lm

PROBLEMS = [
    {"question": "Ann has 2 + 3 apples. How many?", "answer": "2 and 3 make 5.\n#### 5"},
    {"question": "What is 10 + 7?", "answer": "#### 17"},
    {"question": "A box has 4 + 4 pens, how many?", "answer": "#### 9"},  # a wrong gold answer: rejected
]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_generate_cot_resumes_and_traces_split(tmp_path):
    prompts = tmp_path / "problems.jsonl"
    prompts.write_text("".join(json.dumps(p) + "\n" for p in PROBLEMS))
    out = tmp_path / "traces.jsonl"
    with fake_openai(faults=["429", "500", "malformed"]) as server:
        args = ["generate", "-p", prompts, "-o", out, "--base-url", server.url, "--model", "fake", "--n", "2"]
        args += ["--cot", "--price-input", "1", "--price-output", "2"]
        first = distill_cli(*args, cwd=tmp_path, env={"FAKE_KEY": "sk-test"})
        assert first.returncode == 0, first.stderr
        summary = json.loads(first.stdout)
        assert summary["written"] == 6 and summary["retries"] >= 3 and summary["cost"] > 0
        asked = server.stats()["requests"]
        again = distill_cli(*args, cwd=tmp_path)
        assert again.returncode == 0, again.stderr
        assert json.loads(again.stdout)["skipped"] == 6 and server.stats()["requests"] == asked  # asked nothing
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 6 and len({r["id"] for r in rows}) == 6
    assert all("step by step" in (r.get("prompt") or json.dumps(r.get("messages"))) for r in rows)

    split = distill_cli("traces", out, "-o", tmp_path / "split", cwd=tmp_path)
    assert split.returncode == 0, split.stderr
    result = json.loads(split.stdout)
    assert result["traces"] == 6 and result["questions"] == 3
    verified = (tmp_path / "split" / "verified.jsonl").read_text().splitlines()
    rejected = [json.loads(line) for line in (tmp_path / "split" / "rejected.jsonl").read_text().splitlines()]
    assert len(rejected) == 2 and all("8 != 9" in r["reason"] for r in rejected)
    assert 1 <= len(verified) <= 4  # identical verified answers may be deduplicated


def test_generate_bad_input_is_one_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q", "answer": "a"}\n{oops\n')
    result = distill_cli("generate", "-p", bad, "-o", tmp_path / "o.jsonl", "--model", "m", cwd=tmp_path)
    assert_one_line_error(result, "line 2")
    result = distill_cli("traces", tmp_path / "missing.jsonl", "-o", tmp_path / "s", cwd=tmp_path)
    assert_one_line_error(result, "does not exist")
    result = distill_cli("serve", "--model", tmp_path / "nowhere", cwd=tmp_path)
    assert_one_line_error(result, "is not a model folder")


def test_serve_answers_an_openai_client(tmp_path):
    from openai import OpenAI

    model = tmp_path / "tiny"
    tiny_chat_lm(model)
    port = free_port()
    env = {**os.environ, "DISTILL_CACHE": str(tmp_path / ".cache")}
    command = [sys.executable, "-m", "distill.cli", "serve", "--model", str(model), "--port", str(port)]
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert process.poll() is None, process.stderr.read().decode() if process.stderr else ""
            try:
                httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=1)
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "distill serve did not start within 60 s"
                time.sleep(0.2)
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused")
        assert [m.id for m in client.models.list()] == ["tiny"]
        answer = client.completions.create(model="tiny", prompt="the movie was", max_tokens=5, temperature=0)
        assert answer.usage is not None and answer.usage.completion_tokens <= 5
        assert answer.choices[0].finish_reason in ("stop", "length")
    finally:
        process.terminate()
        process.wait(timeout=30)
