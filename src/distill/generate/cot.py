"""Chain-of-thought distillation by rejection sampling: prompt the teacher to reason, keep the traces whose final
answer verifies, and turn them into training rows for the student.

The generation step writes one record per sampled trace:

    {"id", "prompt", "completion", "gold", "sample_index", "usage": {"prompt_tokens", "completion_tokens"},
     "cost" (optional), "question" (optional)}

`split_traces` checks each completion's final answer (`verify.extract_answer` + `verify.verify`) and returns the
verified traces as prompt/completion rows (the `lm_data` JSONL format), the rejected ones with their reason, and a
summary; `write_split` stores the three in a folder.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from distill.data import json_lines
from distill.errors import DataError, DistillError
from distill.generate.verify import NO_ANSWER, Mode, extract_answer, verify

DEFAULT_COT_TEMPLATE = (
    "Solve the following problem. Reason step by step, writing each calculation out, "
    'and finish with a last line of the form "#### <answer>" where <answer> is only the final number.\n\n'
    "Problem: {question}\n\n"
    "Solution:"
)
"""The teacher's prompt; `{question}` is replaced by the problem text."""

QUESTION_ONLY_TEMPLATE = "{question}\n"
"""A bare prompt for a small student that learns the reasoning format from the traces themselves."""

REQUIRED_KEYS = ("id", "prompt", "completion", "gold")


def build_prompt(question: str, template: str = DEFAULT_COT_TEMPLATE) -> str:
    """The template with `{question}` replaced (plain replacement: other braces in it, e.g. \\boxed{}, stay)."""
    if "{question}" not in template:
        raise DistillError("the prompt template must contain '{question}' where the problem text goes")
    return template.replace("{question}", question.strip())


def split_traces(
    records: Iterable[Mapping[str, Any]],
    mode: Mode | str = "auto",
    *,
    max_per_question: int | None = None,
    dedupe: bool = False,
    student_template: str | None = None,
    rel_tol: float = 1e-6,
    abs_tol: float = 1e-9,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, Any]]:
    """Verify each trace's final answer against its gold answer; return (verified rows, rejected rows, summary).

    Verified rows are `{"prompt", "completion", "id"}`, plus the record's "top_logprobs" when it has them. With `student_template` the prompt is rebuilt from the
    record's "question" (so the student need not see the teacher's instructions); otherwise the teacher's prompt
    is kept. `dedupe` drops a verified completion identical (up to surrounding whitespace) to one already kept for
    the same question; `max_per_question` keeps the first m verified traces of each question (in sample order).
    Rejected rows keep the record's id, prompt, completion, gold and sample_index, plus "predicted" and "reason".
    """
    if max_per_question is not None and max_per_question < 1:
        raise DistillError(f"max_per_question must be at least 1 (got {max_per_question})")
    rows = [_checked(record, i, student_template is not None) for i, record in enumerate(records)]
    first_seen: dict[str, int] = {}
    for i, row in enumerate(rows):
        first_seen.setdefault(question_key(row), i)
    # questions in order of first appearance, each question's traces by sample_index (stable for equal indices)
    rows.sort(key=lambda r: (first_seen[question_key(r)], _sample_index(r)))
    verified: list[dict[str, Any]] = []
    rejected: list[dict[str, Any]] = []
    kept: dict[str, list[str]] = {}
    passed: Counter[str] = Counter()
    duplicates = over_limit = 0
    reasons: Counter[str] = Counter()
    for row in rows:
        qid = question_key(row)
        verdict = verify(
            extract_answer(row["completion"]), gold_answer(row["gold"]), mode, rel_tol=rel_tol, abs_tol=abs_tol
        )
        if not verdict.ok:
            reasons["no_answer" if verdict.reason == NO_ANSWER else "wrong_answer"] += 1
            rejected.append(
                {
                    "id": row["id"],
                    "prompt": row["prompt"],
                    "completion": row["completion"],
                    "gold": row["gold"],
                    "sample_index": row.get("sample_index"),
                    "predicted": verdict.predicted,
                    "reason": verdict.reason,
                }
            )
            continue
        passed[qid] += 1
        previous = kept.setdefault(qid, [])
        if dedupe and row["completion"].strip() in previous:
            duplicates += 1
            continue
        if max_per_question is not None and len(previous) >= max_per_question:
            over_limit += 1
            continue
        previous.append(row["completion"].strip())
        prompt = build_prompt(row["question"], student_template) if student_template is not None else row["prompt"]
        entry = {"prompt": prompt, "completion": row["completion"], "id": row["id"]}
        if row.get("top_logprobs"):  # the teacher's token distributions: `distill cache from-generated` reads them
            entry["top_logprobs"] = row["top_logprobs"]
        verified.append(entry)
    summary = _summary(rows, verified, passed, reasons, duplicates, over_limit, str(mode))
    return verified, rejected, summary


def gold_answer(gold: Any) -> str:
    """The reference answer of a record: a worked solution (GSM8K's `answer`, ending in `#### x`) gives its final
    answer, a bare answer is kept as it is."""
    text = str(gold)
    return (extract_answer(text) or text) if "####" in text or "\\boxed" in text else text


def question_key(row: Mapping[str, Any]) -> str:
    """What makes two traces answers to the same question: the question before a template, else the prompt (each
    trace's own `id` hashes its sample index too)."""
    return str(row.get("question") or row["prompt"])


def _checked(record: Mapping[str, Any], index: int, needs_question: bool) -> Mapping[str, Any]:
    if not isinstance(record, Mapping):
        raise DataError(f"trace {index}: expected an object, got {type(record).__name__}")
    missing = [key for key in REQUIRED_KEYS if key not in record]
    if needs_question and "question" not in record:
        missing.append("question (needed by the student template)")
    if missing:
        raise DataError(f"trace {index} (id {record.get('id', '?')}) lacks {', '.join(missing)}")
    if not isinstance(record["completion"], str) or not isinstance(record["prompt"], str):
        raise DataError(f"trace {index} (id {record['id']}): prompt and completion must be strings")
    return record


def _sample_index(record: Mapping[str, Any]) -> int:
    value = record.get("sample_index")
    return value if isinstance(value, int) else 0


def _summary(
    rows: list[Mapping[str, Any]],
    verified: list[dict[str, Any]],
    passed: Counter[str],
    reasons: Counter[str],
    duplicates: int,
    over_limit: int,
    mode: str,
) -> dict[str, Any]:
    questions = len({question_key(r) for r in rows})
    traces = len(rows)
    n_passed = sum(passed.values())
    prompt_tokens = completion_tokens = 0
    costs = [float(c) for c in (r.get("cost", (r.get("usage") or {}).get("cost")) for r in rows) if c is not None]
    for r in rows:
        usage = r.get("usage") or {}
        prompt_tokens += int(usage.get("prompt_tokens") or 0)
        completion_tokens += int(usage.get("completion_tokens") or 0)
    cost = sum(costs) if costs else None
    return {
        "mode": mode,
        "questions": questions,
        "traces": traces,
        "traces_per_question": traces / questions if questions else 0.0,
        "verified": n_passed,
        "rejected": traces - n_passed,
        "rejected_no_answer": reasons["no_answer"],
        "rejected_wrong_answer": reasons["wrong_answer"],
        "pass_rate": n_passed / traces if traces else 0.0,
        "questions_solved": len(passed),
        "solved_rate": len(passed) / questions if questions else 0.0,
        "kept": len(verified),
        "dropped_duplicates": duplicates,
        "dropped_over_limit": over_limit,
        "tokens": {
            "prompt": prompt_tokens,
            "completion": completion_tokens,
            "total": prompt_tokens + completion_tokens,
        },
        "cost": cost,
        "cost_per_kept_trace": cost / len(verified) if cost is not None and verified else None,
    }


def write_split(
    verified: list[dict[str, Any]], rejected: list[dict[str, Any]], out_dir: Path | str, summary: Mapping[str, Any]
) -> dict[str, Path]:
    """Write verified.jsonl (training rows), rejected.jsonl and summary.json into out_dir; return their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"verified": out / "verified.jsonl", "rejected": out / "rejected.jsonl", "summary": out / "summary.json"}
    for name, rows in (("verified", verified), ("rejected", rejected)):
        with paths[name].open("w", encoding="utf-8") as handle:
            for row in rows:
                handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    paths["summary"].write_text(json.dumps(dict(summary), indent=2) + "\n", encoding="utf-8")
    return paths


def read_traces(path: Path | str) -> list[dict[str, Any]]:
    """The records of a generation JSONL file (one object a line), with a DataError naming a bad line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"trace file {path} does not exist")
    records: list[dict[str, Any]] = []
    for where, record in json_lines(path):
        if not isinstance(record, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
        records.append(record)
    return records
