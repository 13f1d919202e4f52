"""Chain-of-thought distillation by rejection sampling: prompt the teacher to reason, keep the traces whose final
answer verifies, and turn them into training rows for the student.

The generation step writes one record per sampled trace:

    {"id", "prompt", "completion", "gold", "sample_index", "usage": {"prompt_tokens", "completion_tokens"},
     "cost" (optional), "question" (optional)}

`split_traces` checks each completion's final answer (`verify.extract_answer` + `verify.verify`) and returns the
verified traces as prompt/completion rows (the `lm_data` JSONL format), the rejected ones with their reason, and a
summary; `write_split` stores the three in a folder. A trace without a gold answer needs a judge's verdict instead
(`distill.generate.judge`, run by `judge_and_split`): kept or rejected by its score, which both files record.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from distill.data import json_lines
from distill.errors import DataError, DistillError
from distill.generate.client import TeacherClient, run_async
from distill.generate.judge import Judgment, ajudge, check_min_score, judge_summary
from distill.generate.verify import NO_ANSWER, Mode, extract_answer, verify
from distill.progress import NULL, Reporter

DEFAULT_COT_TEMPLATE = (
    "Solve the following problem. Reason step by step, writing each calculation out, "
    'and finish with a last line of the form "#### <answer>" where <answer> is only the final number.\n\n'
    "Problem: {question}\n\n"
    "Solution:"
)
"""The teacher's prompt; `{question}` is replaced by the problem text."""

QUESTION_ONLY_TEMPLATE = "{question}\n"
"""A bare prompt for a small student that learns the reasoning format from the traces themselves."""

REQUIRED_KEYS = ("id", "prompt", "completion")


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
    judgments: Sequence[Judgment | None] | None = None,
    judge: Mapping[str, Any] | None = None,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, Any]]:
    """Verify each trace's final answer against its gold answer; return (verified rows, rejected rows, summary).

    Verified rows are `{"prompt", "completion", "id"}`, plus the record's "top_logprobs" when it has them. With `student_template` the prompt is rebuilt from the
    record's "question" (so the student need not see the teacher's instructions); otherwise the teacher's prompt
    is kept. `dedupe` drops a verified completion identical (up to surrounding whitespace) to one already kept for
    the same question; `max_per_question` keeps the first m verified traces of each question (in sample order).
    Rejected rows keep the record's id, prompt, completion, gold and sample_index, plus "predicted" and "reason".
    A record without a gold answer is decided by `judgments[i]` (one per record, None for those with a gold
    answer): both its rows carry "judge" {score, reason}; `judge` is the judge's summary (`judge.judge_summary`).
    """
    if max_per_question is not None and max_per_question < 1:
        raise DistillError(f"max_per_question must be at least 1 (got {max_per_question})")
    records = list(records)
    if judgments is not None and len(judgments) != len(records):
        raise DistillError(f"{len(judgments)} judgments for {len(records)} traces")
    rows = [_checked(record, i, student_template is not None, judgments) for i, record in enumerate(records)]
    verdicts = {id(row): None if judgments is None else judgments[i] for i, row in enumerate(rows)}
    first_seen: dict[str, int] = {}
    for i, row in enumerate(rows):
        first_seen.setdefault(question_key(row), i)
    # questions in order of first appearance, each question's traces by sample_index (stable for equal indices)
    rows.sort(key=lambda r: (first_seen[question_key(r)], _sample_index(r)))
    verified: list[dict[str, Any]] = []
    rejected: list[dict[str, Any]] = []
    kept: dict[str, list[str]] = {}
    passed: Counter[str] = Counter()
    counts: Counter[str] = Counter()
    for row in rows:
        qid = question_key(row)
        verdict = verdicts[id(row)]
        rejection = _rejection(row, verdict, mode, rel_tol, abs_tol)
        if rejection is not None:
            counts[rejection.pop("kind")] += 1
            rejected.append(rejection)
            continue
        passed[qid] += 1
        previous = kept.setdefault(qid, [])
        if dedupe and row["completion"].strip() in previous:
            counts["duplicates"] += 1
            continue
        if max_per_question is not None and len(previous) >= max_per_question:
            counts["over_limit"] += 1
            continue
        previous.append(row["completion"].strip())
        prompt = build_prompt(row["question"], student_template) if student_template is not None else row["prompt"]
        entry = {"prompt": prompt, "completion": row["completion"], "id": row["id"]}
        if row.get("top_logprobs"):  # the teacher's token distributions: `distill cache from-generated` reads them
            entry["top_logprobs"] = row["top_logprobs"]
        if verdict is not None:
            entry["judge"] = verdict.record()
        verified.append(entry)
    summary = _summary(rows, verified, passed, counts, str(mode), judge)
    return verified, rejected, summary


def _rejection(
    row: Mapping[str, Any], verdict: Judgment | None, mode: Mode | str, rel_tol: float, abs_tol: float
) -> dict[str, Any] | None:
    """The rejected row of a trace that fails its check (with "kind", the summary's count it adds to), else None."""
    base = {"id": row["id"], "prompt": row["prompt"], "completion": row["completion"], "gold": row.get("gold"),
            "sample_index": row.get("sample_index")}  # fmt: skip
    if verdict is not None:
        if verdict.kept:
            return None
        kind = f"judge_{verdict.failure}" if verdict.failure else "judge_low_score"
        reason = verdict.reason if verdict.failure else f"judge score {verdict.score:g}: {verdict.reason}"
        return {**base, "predicted": None, "reason": reason, "judge": verdict.record(), "kind": kind}
    checked = verify(
        extract_answer(row["completion"]), gold_answer(row["gold"]), mode, rel_tol=rel_tol, abs_tol=abs_tol
    )
    if checked.ok:
        return None
    kind = "no_answer" if checked.reason == NO_ANSWER else "wrong_answer"
    return {**base, "predicted": checked.predicted, "reason": checked.reason, "kind": kind}


def gold_answer(gold: Any) -> str:
    """The reference answer of a record: a worked solution (GSM8K's `answer`, ending in `#### x`) gives its final
    answer, a bare answer is kept as it is."""
    text = str(gold)
    return (extract_answer(text) or text) if "####" in text or "\\boxed" in text else text


def question_key(row: Mapping[str, Any]) -> str:
    """What makes two traces answers to the same question: the question before a template, else the prompt (each
    trace's own `id` hashes its sample index too)."""
    return str(row.get("question") or row["prompt"])


def has_gold(record: Mapping[str, Any]) -> bool:
    """Whether a trace carries a gold answer to verify against (else a judge decides it)."""
    return record.get("gold") is not None


def _checked(
    record: Mapping[str, Any], index: int, needs_question: bool, judgments: Sequence[Judgment | None] | None
) -> Mapping[str, Any]:
    if not isinstance(record, Mapping):
        raise DataError(f"trace {index}: expected an object, got {type(record).__name__}")
    missing = [key for key in REQUIRED_KEYS if key not in record]
    if not has_gold(record) and (judgments is None or judgments[index] is None):
        missing.append(
            "gold (a trace without one needs a judge: distill traces --judge URL --model NAME --rubric FILE)"
        )
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
    counts: Counter[str],
    mode: str,
    judge: Mapping[str, Any] | None,
) -> dict[str, Any]:
    """The counts of a split, the teacher's tokens and cost as the rows record them, the judge's cost (`judge_cost`,
    None without a judge) and both together (`total_cost`, which `cost_per_kept_trace` divides)."""
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
    judge_cost = None if judge is None else float(judge["cost"])
    total = None if cost is None and judge_cost is None else (cost or 0.0) + (judge_cost or 0.0)
    return {
        "mode": mode,
        "questions": questions,
        "traces": traces,
        "traces_per_question": traces / questions if questions else 0.0,
        "verified": n_passed,
        "rejected": traces - n_passed,
        "rejected_no_answer": counts["no_answer"],
        "rejected_wrong_answer": counts["wrong_answer"],
        "judged": sum(1 for r in rows if not has_gold(r)),
        "rejected_judge_low_score": counts["judge_low_score"],
        "rejected_judge_unparseable": counts["judge_unparseable"],
        "rejected_judge_failed": counts["judge_failed"],
        "pass_rate": n_passed / traces if traces else 0.0,
        "questions_solved": len(passed),
        "solved_rate": len(passed) / questions if questions else 0.0,
        "kept": len(verified),
        "dropped_duplicates": counts["duplicates"],
        "dropped_over_limit": counts["over_limit"],
        "tokens": {
            "prompt": prompt_tokens,
            "completion": completion_tokens,
            "total": prompt_tokens + completion_tokens,
        },
        "cost": cost,
        "judge": None if judge is None else dict(judge),
        "judge_cost": judge_cost,
        "total_cost": total,
        "cost_per_kept_trace": total / len(verified) if total is not None and verified else None,
    }


def judge_and_split(
    records: Sequence[Mapping[str, Any]],
    client: TeacherClient,
    rubric: str,
    min_score: float,
    mode: Mode | str = "auto",
    reporter: Reporter = NULL,
    **options: Any,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, Any]]:
    """`split_traces` where the traces without a gold answer are graded by the judge behind `client` with `rubric`
    (kept at `min_score` or above, see `distill.generate.judge`); `options` are split_traces' own. Runs its own
    event loop and closes the client's connections."""
    min_score = check_min_score(min_score)
    ungraded = [i for i, record in enumerate(records) if isinstance(record, Mapping) and not has_gold(record)]

    async def run() -> list[Judgment]:
        try:
            return await ajudge([records[i] for i in ungraded], client, rubric, min_score, reporter)
        finally:
            await client.aclose()

    found = run_async(run) if ungraded else []
    judgments: list[Judgment | None] = [None] * len(records)
    for index, verdict in zip(ungraded, found):
        judgments[index] = verdict
    summary = judge_summary(client, found, min_score)
    return split_traces(records, mode, judgments=judgments, judge=summary, **options)


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
