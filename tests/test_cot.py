"""Chain-of-thought rejection sampling: prompts, splitting traces into verified and rejected, the summary, files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from distill.errors import DataError, DistillError
from distill.generate.cot import (
    DEFAULT_COT_TEMPLATE,
    QUESTION_ONLY_TEMPLATE,
    build_prompt,
    read_traces,
    split_traces,
    write_split,
)
from distill.lm_data import read_examples


def test_build_prompt() -> None:
    prompt = build_prompt("  What is 2 + 3?\n")
    assert "What is 2 + 3?" in prompt and "#### <answer>" in prompt and "step by step" in prompt
    assert "{question}" in DEFAULT_COT_TEMPLATE
    assert build_prompt("Q", r"Put it in \boxed{}: {question}") == r"Put it in \boxed{}: Q"  # other braces stay
    assert build_prompt("Q", QUESTION_ONLY_TEMPLATE) == "Q\n"
    with pytest.raises(DistillError, match=r"\{question\}"):
        build_prompt("Q", "no placeholder")


def trace(qid: str, completion: str, gold: str = "7", index: int = 0, **extra: Any) -> dict[str, Any]:
    return {"id": qid, "prompt": f"prompt {qid}", "question": f"question {qid}", "completion": completion, "gold": gold,
            "sample_index": index, "usage": {"prompt_tokens": 10, "completion_tokens": 5}, **extra}  # fmt: skip


def records() -> list[dict[str, Any]]:
    return [
        trace("q1", "3 + 4 = 7\n#### 7", index=0, cost=0.01),
        trace("q1", "3 + 4 = 8\n#### 8", index=1, cost=0.01),
        trace("q1", "I am not sure.", index=2, cost=0.01),
        trace("q2", "The answer is 12.", gold="12", index=0, cost=0.02),
        trace("q2", "\\boxed{12}", gold="12", index=1, cost=0.02),
        trace("q3", "#### 1", gold="2", index=0, cost=0.03),
    ]


def test_split_traces_counts_and_rows() -> None:
    verified, rejected, summary = split_traces(records())
    assert verified == [
        {"prompt": "prompt q1", "completion": "3 + 4 = 7\n#### 7", "id": "q1"},
        {"prompt": "prompt q2", "completion": "The answer is 12.", "id": "q2"},
        {"prompt": "prompt q2", "completion": "\\boxed{12}", "id": "q2"},
    ]
    assert [(r["id"], r["sample_index"], r["reason"]) for r in rejected] == [
        ("q1", 1, "wrong answer: 8 != 7"),
        ("q1", 2, "no final answer found"),
        ("q3", 0, "wrong answer: 1 != 2"),
    ]
    assert rejected[0]["completion"] == "3 + 4 = 8\n#### 8" and rejected[0]["predicted"] == "8"
    assert summary["questions"] == 3 and summary["traces"] == 6
    assert summary["verified"] == 3 and summary["rejected"] == 3 and summary["kept"] == 3
    assert summary["rejected_no_answer"] == 1 and summary["rejected_wrong_answer"] == 2
    assert summary["pass_rate"] == pytest.approx(0.5)
    assert summary["traces_per_question"] == pytest.approx(2.0)
    assert summary["questions_solved"] == 2 and summary["solved_rate"] == pytest.approx(2 / 3)
    assert summary["tokens"] == {"prompt": 60, "completion": 30, "total": 90}
    assert summary["cost"] == pytest.approx(0.10)
    assert summary["cost_per_kept_trace"] == pytest.approx(0.10 / 3)
    assert summary["mode"] == "auto"


def test_split_traces_orders_by_question_then_sample_index() -> None:
    rows = [trace("b", "#### 7", index=1), trace("a", "#### 7", index=0), trace("b", "#### 7 ", index=0)]
    verified, _, _ = split_traces(rows)
    assert [(r["id"], r["completion"]) for r in verified] == [("b", "#### 7 "), ("b", "#### 7"), ("a", "#### 7")]


def test_max_per_question_and_dedupe() -> None:
    rows = [
        trace("q", c, index=i) for i, c in enumerate(["#### 7", "#### 7\n", "so 7\n#### 7", "#### 6", "7!\n#### 7"])
    ]
    verified, rejected, summary = split_traces(rows, dedupe=True)
    assert [r["completion"] for r in verified] == ["#### 7", "so 7\n#### 7", "7!\n#### 7"]
    assert summary["dropped_duplicates"] == 1 and summary["verified"] == 4 and len(rejected) == 1
    verified, _, summary = split_traces(rows, max_per_question=2)
    assert [r["completion"] for r in verified] == ["#### 7", "#### 7\n"]
    assert summary["dropped_over_limit"] == 2 and summary["kept"] == 2
    verified, _, summary = split_traces(rows, max_per_question=2, dedupe=True)
    assert [r["completion"] for r in verified] == ["#### 7", "so 7\n#### 7"]
    with pytest.raises(DistillError, match="max_per_question"):
        split_traces(rows, max_per_question=0)


def test_student_template_rebuilds_the_prompt_from_the_question() -> None:
    verified, _, _ = split_traces([trace("q", "#### 7")], student_template=QUESTION_ONLY_TEMPLATE)
    assert verified[0]["prompt"] == "question q\n"
    row = trace("q", "#### 7")
    del row["question"]
    with pytest.raises(DataError, match="question"):
        split_traces([row], student_template=QUESTION_ONLY_TEMPLATE)


def test_modes_and_missing_cost() -> None:
    rows = [trace("q", "The answer is (b).", gold="B"), trace("r", "Answer: Paris", gold="paris")]
    for row in rows:
        row.pop("usage")
    verified, rejected, summary = split_traces(rows)
    assert len(verified) == 2 and not rejected
    assert summary["cost"] is None and summary["cost_per_kept_trace"] is None
    assert summary["tokens"]["total"] == 0
    _, rejected, _ = split_traces([trace("q", "#### 7.0000001", gold="7")], mode="numeric", rel_tol=1e-9)
    assert rejected and rejected[0]["reason"].startswith("wrong answer")
    verified, _, _ = split_traces([trace("q", "#### 7.0000001", gold="7")], mode="numeric", rel_tol=1e-6)
    assert verified


def test_gold_may_be_a_json_number() -> None:
    verified, _, _ = split_traces([trace("q", "#### 1,200", gold=1200)])  # type: ignore[arg-type]
    assert len(verified) == 1


def test_bad_records() -> None:
    with pytest.raises(DataError, match="lacks completion"):
        split_traces([{"id": "q", "prompt": "p", "gold": "1"}])
    with pytest.raises(DataError, match="must be strings"):
        split_traces([{"id": "q", "prompt": "p", "gold": "1", "completion": None}])
    with pytest.raises(DistillError, match="unknown verification mode"):
        split_traces([trace("q", "#### 7")], mode="fuzzy")
    _, _, summary = split_traces([])
    assert summary["traces"] == 0 and summary["pass_rate"] == 0.0


def test_write_split_round_trip(tmp_path: Path) -> None:
    verified, rejected, summary = split_traces(records())
    paths = write_split(verified, rejected, tmp_path / "out", summary)
    assert {p.name for p in paths.values()} == {"verified.jsonl", "rejected.jsonl", "summary.json"}
    assert read_traces(paths["verified"]) == verified
    assert read_traces(paths["rejected"]) == rejected
    assert json.loads(paths["summary"].read_text()) == summary
    examples = read_examples(paths["verified"])  # the training data reader accepts the verified rows as they are
    assert [e.completion for e in examples] == [r["completion"] for r in verified]


def test_read_traces_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        read_traces(tmp_path / "none.jsonl")
    (tmp_path / "bad.jsonl").write_text('{"id": 1}\nnot json\n')
    with pytest.raises(DataError, match="line 2"):
        read_traces(tmp_path / "bad.jsonl")
    (tmp_path / "list.jsonl").write_text("[1, 2]\n")
    with pytest.raises(DataError, match="expected a JSON object"):
        read_traces(tmp_path / "list.jsonl")
