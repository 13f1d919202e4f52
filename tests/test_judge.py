"""Judged traces (`distill traces --judge URL --model NAME --rubric FILE`): the judge's reply format, the rubric
file's hostile forms, and the judge path against a fake judge (the loopback server with scripted replies)."""

from __future__ import annotations

import json
import math
import os
import time

import pytest

from _fake_openai import fake_openai
from distill.errors import DataError, DistillError
from distill.generate.client import Prices, TeacherClient, TeacherClientError
from distill.generate.cot import judge_and_split, split_traces, write_split
from distill.generate.judge import (
    MAX_RUBRIC_BYTES,
    check_min_score,
    judge_messages,
    judgment,
    parse_judgment,
    read_rubric,
)
from distill.lm_data import read_examples
from test_cli import assert_one_line_error, distill_cli

RUBRIC = "Score 10 for a correct, clearly reasoned answer; 0 for a wrong or missing one."
REPLIES = [
    ["GOOD-ANSWER", '{"score": 9, "reason": "clear and correct"}'],
    ["WEAK-ANSWER", 'The answer skips steps. {"score": 3, "reason": "skips steps"}'],
    ["FENCED-ANSWER", '```json\n{"score": 7, "reason": "just enough"}\n```'],
    ["GARBAGE-ANSWER", "I refuse to grade this."],
    ["OUT-OF-RANGE", '{"score": 42, "reason": "very good"}'],
]


@pytest.fixture(scope="module")
def server():
    with fake_openai(replies=REPLIES) as running:
        yield running


def trace(tid: str, completion: str, gold: str | None = None, index: int = 0) -> dict:
    row = {"id": tid, "prompt": f"Explain {tid}.", "question": f"explain {tid}", "completion": completion,
           "sample_index": index, "usage": {"prompt_tokens": 10, "completion_tokens": 20, "cost": 0.01}}  # fmt: skip
    if gold is not None:
        row["gold"] = gold
    return row


def traces() -> list[dict]:
    return [
        trace("g1", "3 + 4 = 7\n#### 7", gold="7"),  # gold answers: verified as before, never judged
        trace("g2", "#### 8", gold="7"),
        trace("a", "GOOD-ANSWER: because ..."),
        trace("b", "WEAK-ANSWER: it is so"),
        trace("c", "FENCED-ANSWER: first ..."),
        trace("d", "GARBAGE-ANSWER"),
        trace("e", "OUT-OF-RANGE"),
        trace("a", "GOOD-ANSWER: because ...", index=1),  # a duplicate of a kept one
    ]


def judge(server, **options) -> TeacherClient:
    return TeacherClient(server.url, "judge", backoff=0.001, prices=Prices(2.0, 8.0), **options)


def test_the_reply_format():
    assert parse_judgment('{"score": 8, "reason": "fine"}') == (8.0, "fine")
    assert parse_judgment('Thinking... ```json\n{"score": 6.5, "reason": "ok"}\n```') == (6.5, "ok")
    assert parse_judgment('{"score": 1, "reason": "x"} then {"score": 9, "reason": "last wins"}') == (9.0, "last wins")
    assert parse_judgment('{"verdict": {"score": 2, "reason": "nested"}}') == (2.0, "nested")
    bad = {
        "no JSON object": "I refuse.",
        "not a number": '{"score": "8", "reason": "a string"}',
        "not from 0 to 10": '{"score": 11, "reason": "too high"}',
        "not from 0": '{"score": NaN, "reason": "nan"}',
        '"reason"': '{"score": 5}',
    }
    for fragment, reply in bad.items():
        with pytest.raises(ValueError, match=fragment):
            parse_judgment(reply)
    with pytest.raises(ValueError, match="not a number"):
        parse_judgment('{"score": true, "reason": "a boolean"}')
    verdict = judgment("nonsense", 7.0)
    assert not verdict.kept and verdict.score is None and verdict.failure == "unparseable"
    assert "not parseable" in verdict.reason and "nonsense" in verdict.reason
    assert judgment('{"score": 7, "reason": "r"}', 7.0).kept and not judgment('{"score": 6.9, "reason": "r"}', 7.0).kept


def test_garbage_replies_are_rejections_quickly():
    started = time.monotonic()
    for reply in ("{" * 200_000, '{"a":' * 50_000, "\x00\xff" * 10_000, '{"score": 1e999, "reason": "inf"}', ""):
        assert judgment(reply, 5.0).failure == "unparseable"
    assert time.monotonic() - started < 5


def test_rubric_and_threshold_hostile_input(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        read_rubric(tmp_path / "missing.md")
    with pytest.raises(DataError, match="is not a file"):
        read_rubric(tmp_path)
    huge = tmp_path / "huge.md"
    huge.write_text("x" * (MAX_RUBRIC_BYTES + 1))
    with pytest.raises(DataError, match="more than the 65,536"):
        read_rubric(huge)
    empty = tmp_path / "empty.md"
    empty.write_text("  \n")
    with pytest.raises(DataError, match="is empty"):
        read_rubric(empty)
    binary = tmp_path / "binary.md"
    binary.write_bytes(b"score \xff\xfe")
    with pytest.raises(DataError, match="UTF-8"):
        read_rubric(binary)
    good = tmp_path / "rubric.md"
    good.write_text(f"\n{RUBRIC}\n")
    assert read_rubric(good) == RUBRIC
    if os.geteuid() != 0:  # root reads any file whatever its mode
        good.chmod(0)
        with pytest.raises(DataError, match="cannot read the rubric"):
            read_rubric(good)
    for bad in (-1, 11, math.nan, math.inf):
        with pytest.raises(DistillError, match="min_score must be a number from 0 to 10"):
            check_min_score(bad)


def test_the_judge_keeps_and_rejects_by_score(server, tmp_path):
    server.configure(replies=REPLIES)
    records = traces()
    verified, rejected, summary = judge_and_split(records, judge(server, concurrency=4), RUBRIC, 7.0, dedupe=True)
    bodies = server.stats()["bodies"]
    assert len(bodies) == 6  # the six traces without a gold answer, each once
    assert all(RUBRIC in body["messages"][0]["content"] for body in bodies)
    assert all(body["temperature"] == 0.0 for body in bodies)
    assert {tuple(sorted(r.get("judge", {}).items())) for r in verified if r["id"] != "g1"} == {
        (("reason", "clear and correct"), ("score", 9.0)),
        (("reason", "just enough"), ("score", 7.0)),
    }
    assert [r["id"] for r in verified] == ["g1", "a", "c"] and "judge" not in verified[0]
    reasons = {r["id"]: r for r in rejected}
    assert set(reasons) == {"g2", "b", "d", "e"}
    assert reasons["g2"]["reason"] == "wrong answer: 8 != 7" and "judge" not in reasons["g2"]
    assert reasons["b"]["reason"] == "judge score 3: skips steps" and reasons["b"]["judge"]["score"] == 3.0
    assert "not parseable" in reasons["d"]["reason"] and reasons["d"]["judge"]["score"] is None
    assert "not from 0 to 10" in reasons["e"]["reason"]
    assert summary["judged"] == 6 and summary["kept"] == 3 and summary["dropped_duplicates"] == 1
    assert summary["rejected_judge_low_score"] == 1 and summary["rejected_judge_unparseable"] == 2
    assert summary["rejected_wrong_answer"] == 1 and summary["rejected_judge_failed"] == 0
    assert summary["judge"]["requests"] == 6 and summary["judge"]["model"] == "judge"
    assert summary["judge"]["mean_score"] == pytest.approx((9 + 3 + 7 + 9) / 4)
    assert summary["judge_cost"] > 0 and summary["judge_cost"] == summary["judge"]["cost"]
    assert summary["cost"] == pytest.approx(0.08)
    assert summary["total_cost"] == pytest.approx(0.08 + summary["judge_cost"])
    assert summary["cost_per_kept_trace"] == pytest.approx(summary["total_cost"] / 3)
    paths = write_split(verified, rejected, tmp_path / "split", summary)
    assert len(read_examples(paths["verified"])) == 3  # judged rows stay training rows


def test_judge_failures(server):
    records = [trace("a", "GOOD-ANSWER"), trace("b", "GOOD-ANSWER!")]
    server.configure(replies=REPLIES, faults=["500", "429"])  # retried through the client
    verified, _, summary = judge_and_split(records, judge(server, concurrency=1), RUBRIC, 7.0)
    assert len(verified) == 2 and summary["judge"]["retries"] == 2
    server.configure(replies=REPLIES, faults=["500"] * 3)  # still failing after its retries: a rejection
    verified, rejected, summary = judge_and_split(records, judge(server, concurrency=1, max_retries=2), RUBRIC, 7.0)
    assert [r["id"] for r in rejected] == ["a"] and "judge request failed" in rejected[0]["reason"]
    assert summary["rejected_judge_failed"] == 1 and len(verified) == 1
    server.configure(replies=REPLIES, faults=["401"])  # refused: retrying cannot help, so the step stops
    with pytest.raises(TeacherClientError, match="401"):
        judge_and_split(records, judge(server, concurrency=1), RUBRIC, 7.0)


def test_a_trace_without_gold_needs_a_judge():
    with pytest.raises(DataError, match="lacks gold .*--judge"):
        split_traces([trace("a", "GOOD-ANSWER")])
    messages = judge_messages(RUBRIC, "what?", "this")
    assert messages[0]["role"] == "system" and '"score"' in messages[0]["content"]
    assert "what?" in messages[1]["content"] and "this" in messages[1]["content"]


def test_cli_traces_with_a_judge(tmp_path):
    generated = tmp_path / "traces.jsonl"
    generated.write_text("".join(json.dumps(row) + "\n" for row in traces()))
    rubric = tmp_path / "rubric.md"
    rubric.write_text(RUBRIC)
    out = tmp_path / "split"
    with fake_openai(replies=REPLIES) as running:
        args = ["traces", generated, "-o", out, "--judge", running.url, "--model", "judge", "--rubric", rubric]
        result = distill_cli(*args, "--judge-price-input", "2", "--judge-price-output", "8", cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        summary = json.loads(result.stdout)
        assert summary["kept"] == 3 and summary["judge"]["requests"] == 6 and summary["judge_cost"] > 0
        strict = distill_cli(*args, "--min-score", "9.5", "-o", tmp_path / "strict", cwd=tmp_path)
        assert strict.returncode == 0 and json.loads(strict.stdout)["kept"] == 1  # only the gold-verified trace
    rejected = [json.loads(line) for line in (out / "rejected.jsonl").read_text().splitlines()]
    assert any(r["reason"].startswith("judge answer not parseable") for r in rejected)
    assert json.loads((out / "summary.json").read_text()) == summary
    huge = tmp_path / "huge.md"
    huge.write_text("x" * (MAX_RUBRIC_BYTES + 1))
    url = "http://127.0.0.1:9/v1"  # never reached: each error comes first
    base = ["traces", generated, "-o", out, "--judge", url, "--model", "judge"]
    assert_one_line_error(distill_cli(*base, "--rubric", tmp_path / "none.md", cwd=tmp_path), "does not exist")
    assert_one_line_error(distill_cli(*base, "--rubric", huge, cwd=tmp_path), "more than the 65,536")
    assert_one_line_error(distill_cli(*base, "--rubric", rubric, "--min-score", "nan", cwd=tmp_path), "--min-score")
    assert_one_line_error(distill_cli("traces", generated, "-o", out, "--judge", url, cwd=tmp_path), "--rubric")
    assert_one_line_error(distill_cli("traces", generated, "-o", out, "--model", "j", cwd=tmp_path), "--judge")
    assert_one_line_error(distill_cli("traces", generated, "-o", out, cwd=tmp_path), "lacks gold")
