"""An LM cascade: the student answers when it is confident enough, the teacher (an OpenAI-compatible endpoint)
otherwise; `distill serve --teacher-url` and the service's deployments of LM students.

A request's prompts are answered by the student first, with the confidence `distill.lm_confidence` measures (the
agreement measure samples k more answers per prompt in the same batch). A prompt whose confidence is below the
threshold (for n > 1 choices: the least confident of them) is escalated: the teacher gets the same request for
the escalated prompts (as text, whatever form they came in), and its choices replace the student's. The response
says who answered in its header `X-Distill-Answered-By` (`student`, `teacher`, or `mixed` for several prompts) and in
each choice's `answered_by`; `usage` counts the student's tokens for the prompts it answered and the teacher's, as
its endpoint reports them, for the others.

Streaming: the student's answer is generated in full first (its confidence needs every token); then a confident
answer is streamed from the finished rows, and an escalated one is the teacher's own stream, relayed as it arrives
(after the student's choices when a completions request mixes both). A teacher that fails is a 502 `teacher_failed`
(an error event when its stream breaks after it started).

The threshold is given, or chosen at start-up on a validation file (`distill.serve.calibrate`). The cascade counts
prompts, escalations, and for escalated prompts how often the student's answer was the teacher's (first choices
compared as the confidence compares answers); `GET /v1/cascade` shows them with the threshold and its validation
figures; `record` also passes each request's counts on (the service stores them with its deployment).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from distill import cascade_curve
from distill.engine import Engine
from distill.engine import Sequence as Row
from distill.generate.client import TeacherClient
from distill.lm_confidence import ConfidenceConfig
from distill.serve.calibrate import (
    Calibration,
    calibrate,
    read_validation,
    row_confidence,
    sample_rows,
    teacher_answers,
    with_logprobs,
)
from distill.serve.escalate import TeacherEndpoint

HEADER = "X-Distill-Answered-By"
CURVE_POINTS = 21  # points of the validation curve `GET /v1/cascade` shows
Record = Callable[[int, int, int], None]  # (prompts, escalated, escalated that agreed) of one request


@dataclass
class CascadeSetup:
    """What `create_app` needs to serve a cascade: the teacher, the confidence measure, and a threshold (given, or
    chosen on `validation` for `target`: agreement with the teacher, or a share of its accuracy with gold answers,
    reached by the lower confidence bound at level `assurance`; validation answers are at most `max_tokens` long). `on_calibrated` sees the calibration (the CLI prints it)."""

    teacher: TeacherEndpoint
    confidence: ConfidenceConfig = field(default_factory=ConfidenceConfig)
    threshold: float | None = None
    validation: Path | None = None
    target: float = 0.95
    assurance: float = cascade_curve.ASSURANCE
    max_tokens: int = 256
    batch_size: int = 64
    on_calibrated: Callable[[Calibration], None] | None = None
    record: Record | None = None

    def __post_init__(self) -> None:
        if (self.threshold is None) == (self.validation is None):
            raise ValueError("a cascade needs a threshold or a validation file to choose one on, not both")
        if not 0 < self.target <= 1 or not 1 <= self.max_tokens <= 1_000_000 or self.batch_size < 1:
            raise ValueError("target must be in (0, 1], max_tokens 1 to 1000000 and batch_size at least 1")
        if not 0 < self.assurance < 1:
            raise ValueError(f"assurance must lie in (0, 1), not {self.assurance}")


@dataclass
class Tally:
    requests: int = 0  # prompts
    escalated: int = 0
    escalated_agree: int = 0


class Cascade:
    """A running cascade: its setup, threshold, validation figures and live counts."""

    def __init__(self, setup: CascadeSetup, threshold: float, calibration: Calibration | None = None) -> None:
        self.setup, self.threshold, self.calibration = setup, threshold, calibration
        self.tally, self._lock = Tally(), threading.Lock()

    @property
    def teacher(self) -> TeacherEndpoint:
        return self.setup.teacher

    async def count(self, prompts: int, escalated: int, agreed: int) -> None:
        """Add to the counts; `setup.record` (a store's write) runs in a worker thread, off the event loop."""
        with self._lock:
            self.tally.requests += prompts
            self.tally.escalated += escalated
            self.tally.escalated_agree += agreed
        if self.setup.record is not None and (prompts or escalated or agreed):
            await asyncio.to_thread(self.setup.record, prompts, escalated, agreed)

    def public(self) -> dict[str, Any]:
        tally = self.tally
        validation = None
        if self.calibration is not None:
            points = cascade_curve.thin(self.calibration.curve, CURVE_POINTS)
            validation = asdict(self.calibration.choice) | {"reference": self.calibration.reference,
                                                            "curve": [asdict(p) for p in points]}  # fmt: skip
        return {
            "object": "cascade",
            "teacher": {"base_url": self.teacher.base_url, "model": self.teacher.model},
            "confidence": self.setup.confidence.model_dump(),
            "threshold": self.threshold,
            "validation": validation,
            "live": {
                "requests": tally.requests,
                "escalated": tally.escalated,
                "escalation_rate": tally.escalated / tally.requests if tally.requests else None,
                "escalated_agreement": tally.escalated_agree / tally.escalated if tally.escalated else None,
            },
        }


def build(setup: CascadeSetup, engine: Engine) -> Cascade:
    """The cascade of `setup` for the student in `engine`, its threshold chosen on the validation file if need be
    (the teacher answers the rows that carry no teacher answer through its endpoint)."""
    if setup.threshold is not None:
        return Cascade(setup, setup.threshold)
    assert setup.validation is not None
    rows = read_validation(setup.validation)
    teacher = setup.teacher
    client = TeacherClient(teacher.base_url, teacher.model, teacher.api_key, concurrency=8, timeout=teacher.timeout,
                           max_retries=2, transport=teacher.transport)  # fmt: skip
    found = calibrate(
        engine, rows, lambda todo: teacher_answers(client, todo, setup.max_tokens), setup.confidence, setup.target,
        setup.max_tokens, setup.batch_size, setup.assurance,
    )  # fmt: skip
    if setup.on_calibrated is not None:
        setup.on_calibrated(found)
    return Cascade(setup, found.choice.threshold, found)


@dataclass
class Student:
    """A request's rows after the student answered: per prompt, whether it goes to the teacher."""

    rows: list[Row]  # prompt-major, n per prompt
    n: int
    escalate: list[bool]

    def answered_by(self, prompt: int) -> str:
        return "teacher" if self.escalate[prompt] else "student"

    def header(self) -> str:
        return "teacher" if all(self.escalate) else "student" if not any(self.escalate) else "mixed"


def prepare(cascade: Cascade, rows: list[Row], n: int, seed: int | None) -> list[Row]:
    """The student's rows set to keep their log-probs, and the k sampled rows per prompt the measure needs: every
    row to generate."""
    config = cascade.setup.confidence
    for row in rows:
        row.params = with_logprobs(row.params)
    samples = [sample_rows(config, rows[p].prompt_ids, rows[p].params, seed) for p in range(0, len(rows), n)]
    cascade_samples = [row for group in samples for row in group]
    return [*rows, *cascade_samples]


def decide(cascade: Cascade, generated: list[Row], rows: int, n: int) -> Student:
    """Which prompts go to the teacher, once `generated` (the rows of `prepare`, the first `rows` of them the
    student's answers) are done."""
    config, answers, extra = cascade.setup.confidence, generated[:rows], generated[rows:]
    k = config.samples if config.measure == "agreement" else 0
    escalate = []
    for p in range(rows // n):
        samples = extra[p * k : (p + 1) * k]
        lowest = min(row_confidence(config, answers[p * n + i], samples) for i in range(n))
        escalate.append(lowest < cascade.threshold)
    return Student(answers, n, escalate)
