"""Traces without a gold answer, graded by a judge model with a rubric (`distill traces --judge URL --model NAME
--rubric FILE`).

The judge is any OpenAI-compatible chat endpoint, asked through `TeacherClient`, so its requests are bounded,
retried (429, 5xx, timeouts, malformed bodies) and costed like the teacher's. Each trace is one request at
temperature 0: a system message holding the rubric and the answer format, a user message holding the question and
the answer to grade. The judge must reply with one JSON object

    {"score": <a number from 0 to 10>, "reason": "<why>"}

bare, in a ```json fence or after other text (the last object with a "score" counts). A trace is kept when its score
is at least `min_score`. A reply without such an object, with a score that is not a number in [0, 10], or without a
string reason is a rejection that says so, never an error; so is a request that still failed after its retries. A
request the API refuses outright (a wrong key, an unknown model: retrying cannot help) stops the whole step.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distill.data import read_text
from distill.errors import DataError, DistillError
from distill.generate.client import TeacherClient, TeacherClientError, run_workers
from distill.progress import NULL, Cancelled, Reporter

MAX_SCORE = 10.0
DEFAULT_MIN_SCORE = 7.0
MAX_RUBRIC_BYTES = 64 * 1024
"""A rubric is a page of instructions; a larger file is refused before it is read (every request would carry it)."""
JUDGE_MAX_TOKENS = 1024
MAX_REPLY_CHARS = 20_000
"""Only the end of a longer reply is searched for the JSON object."""
MAX_CANDIDATES = 256
"""At most this many '{' (from the end) are tried as the start of the object."""
ANSWER_FORMAT = (
    "Grade the answer below with this rubric. Reply with one JSON object and nothing else: "
    '{"score": <a number from 0 to 10>, "reason": "<one or two sentences>"}'
)


@dataclass(frozen=True)
class Judgment:
    """A judge's verdict on one trace. `score` is None when there is none to read: then `failure` says why
    ("unparseable": the reply had no valid object, "failed": the request gave up after its retries)."""

    score: float | None
    reason: str
    kept: bool
    failure: str | None = None

    def record(self) -> dict[str, Any]:
        """What the verified and rejected files keep of it."""
        return {"score": self.score, "reason": self.reason}


def check_min_score(min_score: float, name: str = "min_score") -> float:
    """`min_score` when it is a finite number in [0, MAX_SCORE], else a DistillError naming `name`."""
    if isinstance(min_score, bool) or not isinstance(min_score, int | float):
        raise DistillError(f"{name} must be a number, got {type(min_score).__name__}")
    if not math.isfinite(min_score) or not 0 <= min_score <= MAX_SCORE:
        raise DistillError(f"{name} must be a number from 0 to {MAX_SCORE:g}, got {min_score}")
    return float(min_score)


def read_rubric(path: Path | str) -> str:
    """The rubric in a UTF-8 text (or markdown) file; a DataError for a file that is missing, not a file,
    unreadable, larger than MAX_RUBRIC_BYTES, not UTF-8 or empty."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"rubric file {path} does not exist")
    if not path.is_file():
        raise DataError(f"rubric {path} is not a file")
    try:
        size = path.stat().st_size
        if size > MAX_RUBRIC_BYTES:
            raise DataError(
                f"rubric file {path} has {size:,} bytes, more than the {MAX_RUBRIC_BYTES:,} a rubric may have "
                "(every judge request carries it)"
            )
        text = read_text(path)
    except OSError as error:
        raise DataError(f"cannot read the rubric file {path}: {error.strerror or error}") from None
    if len(text.encode()) > MAX_RUBRIC_BYTES:  # it grew after the check
        raise DataError(f"rubric file {path} has more than the {MAX_RUBRIC_BYTES:,} bytes a rubric may have")
    if not text.strip():
        raise DataError(f"rubric file {path} is empty")
    return text.strip()


def judge_messages(rubric: str, question: str, answer: str) -> list[dict[str, str]]:
    """The judge's conversation for one trace."""
    system = f"{ANSWER_FORMAT}\n\nRubric:\n{rubric}"
    user = f"Question:\n{question}\n\nAnswer to grade:\n{answer}"
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]


def parse_judgment(text: str) -> tuple[float, str]:
    """(score, reason) from a judge's reply (see the module docstring); a ValueError saying what is wrong."""
    tail = text[-MAX_REPLY_CHARS:]
    found = None
    for value in _objects(tail):
        if "score" in value:
            found = value
            break
    if found is None:
        raise ValueError('no JSON object with a "score" in the reply')
    score, reason = found["score"], found.get("reason")
    if isinstance(score, bool) or not isinstance(score, int | float):
        raise ValueError(f"the score {score!r} is not a number")
    if not math.isfinite(score) or not 0 <= score <= MAX_SCORE:
        raise ValueError(f"the score {score!r} is not from 0 to {MAX_SCORE:g}")
    if not isinstance(reason, str):
        raise ValueError('no "reason" string beside the score')
    return float(score), reason


def _objects(text: str) -> Iterator[dict[str, Any]]:
    """The JSON objects that start at the last MAX_CANDIDATES '{' of `text`, last first."""
    decoder = json.JSONDecoder()
    starts = [i for i, char in enumerate(text) if char == "{"][-MAX_CANDIDATES:]
    for start in reversed(starts):
        try:
            value, _ = decoder.raw_decode(text, start)
        except (ValueError, RecursionError):
            continue
        if isinstance(value, dict):
            yield value


def judgment(reply: str, min_score: float) -> Judgment:
    """The verdict a reply gives: kept at `min_score` or above; an unreadable reply is a rejection saying why."""
    try:
        score, reason = parse_judgment(reply)
    except ValueError as why:
        return Judgment(None, f"judge answer not parseable ({why}): {reply[:200]!r}", False, "unparseable")
    return Judgment(score, reason, score >= min_score)


def trace_question(row: Mapping[str, Any]) -> str:
    """What the judge is told was asked: the question before a template, else the prompt."""
    return str(row.get("question") or row.get("prompt") or "")


async def ajudge(
    rows: Sequence[Mapping[str, Any]],
    client: TeacherClient,
    rubric: str,
    min_score: float,
    reporter: Reporter = NULL,
    max_tokens: int = JUDGE_MAX_TOKENS,
) -> list[Judgment]:
    """The judge's verdict on each row (`completion` graded against `question` or `prompt`), in order; at most
    the client's concurrency of requests in flight."""
    min_score = check_min_score(min_score)
    verdicts: list[Judgment | None] = [None] * len(rows)
    pending = iter(range(len(rows)))

    async def work() -> None:
        for index in pending:
            if reporter.cancelled():
                raise Cancelled("judging cancelled")
            row = rows[index]
            messages = judge_messages(rubric, trace_question(row), str(row.get("completion", "")))
            try:
                replies = await client.chat(messages, n=1, temperature=0.0, max_tokens=max_tokens)
            except TeacherClientError as error:
                if not error.retryable:
                    raise
                verdicts[index] = Judgment(None, f"judge request failed: {error}", False, "failed")
            else:
                verdicts[index] = judgment(replies[0].text, min_score)
            reporter.advance(1, cost=client.usage.cost)

    reporter.stage("judge", total=len(rows))
    try:
        await run_workers([work() for _ in range(min(client.concurrency, max(len(rows), 1)))])
    finally:
        reporter.end()
    return [verdict for verdict in verdicts if verdict is not None]


def judge_summary(client: TeacherClient, judgments: Sequence[Judgment], min_score: float) -> dict[str, Any]:
    """The judge's part of the traces summary: its model, threshold, requests, tokens and cost, and mean score."""
    scores = [j.score for j in judgments if j.score is not None]
    usage = client.usage
    return {
        "model": client.model,
        "min_score": min_score,
        "judged": len(judgments),
        "kept": sum(j.kept for j in judgments),
        "mean_score": sum(scores) / len(scores) if scores else None,
        "unparseable": sum(j.failure == "unparseable" for j in judgments),
        "failed": sum(j.failure == "failed" for j in judgments),
        "requests": usage.requests,
        "retries": usage.retries,
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "cost": usage.cost,
    }
