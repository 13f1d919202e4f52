"""A cascade's threshold: the student answers when its confidence reaches it, the teacher answers otherwise.

On N validation rows with the student's confidence c_i, s_i = 1 when the student's answer is right and r_i = 1 when
the teacher's is ("right" is measured against a reference: gold answers, or the teacher's own answers, in which case
r_i = 1 and the score is the agreement with the teacher), a threshold t gives

    escalated(t) = mean_i [c_i < t]                          (the share of rows the teacher answers)
    score(t)     = mean_i (s_i if c_i >= t else r_i)          (the cascade's accuracy, or agreement)

Sorting the rows by confidence, most confident first, the thresholds worth trying are the confidences themselves:
keeping the k most confident rows with the student gives score_k = (sum_{i<=k} s_i + sum_{i>k} r_i) / N, computed for
every k at once with cumulative sums. A threshold cannot split rows of equal confidence, and a row of confidence
-inf (an answer its verifier refused) is never kept. `choose` takes the largest k (the fewest escalations) whose
score reaches `target` times the teacher's score mean_i r_i: with the teacher's answers as the reference, that is an
agreement of at least `target`; with gold answers, at least `target` of the teacher's accuracy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

TOLERANCE = 1e-12  # a score that reaches the target up to rounding counts as reaching it


@dataclass(frozen=True)
class Point:
    """One threshold of the curve and what it gives on the rows it was computed on."""

    threshold: float  # rows of confidence >= threshold stay with the student
    escalated: float  # share of rows sent to the teacher
    score: float  # the cascade's accuracy (or agreement)
    relative: float  # score / the teacher's score (1.0 when the teacher scores 0)


@dataclass(frozen=True)
class Choice:
    threshold: float
    escalation_rate: float
    score: float  # the cascade's, at the threshold
    relative: float  # score / teacher_score
    student_score: float  # the student answering everything
    teacher_score: float  # the teacher answering everything
    target: float
    rows: int


@dataclass(frozen=True)
class _Sorted:
    thresholds: Tensor  # (N + 1,) the threshold that keeps the k most confident rows, k = 0..N
    scores: Tensor  # (N + 1,) float64
    allowed: Tensor  # (N + 1,) bool: k is a possible split
    teacher_score: float
    student_score: float


def _sorted(confidence: Tensor, student_ok: Tensor, teacher_ok: Tensor) -> _Sorted:
    n = int(confidence.numel())
    if n == 0:
        raise ValueError("no validation rows to choose a threshold on")
    if student_ok.shape != confidence.shape or teacher_ok.shape != confidence.shape:
        raise ValueError(
            f"confidence, student_ok and teacher_ok differ in shape: {[confidence.shape, student_ok.shape]}"
        )
    if bool(torch.isnan(confidence).any()):
        raise ValueError("a confidence is NaN")
    order = torch.argsort(confidence, descending=True, stable=True)  # (N,)
    conf_sorted = confidence[order]  # (N,) in the confidences' own precision
    student, teacher = student_ok[order].double(), teacher_ok[order].double()  # (N,), (N,)
    zero = torch.zeros(1, dtype=torch.float64)
    kept = torch.cat([zero, student.cumsum(0)])  # (N + 1,) right answers of the k rows the student keeps
    rest = torch.cat([zero, teacher.flip(0).cumsum(0)]).flip(0)  # (N + 1,) right answers the teacher gives the rest
    allowed = torch.ones(n + 1, dtype=torch.bool)  # (N + 1,)
    allowed[1:n] = conf_sorted[:-1] != conf_sorted[1:]
    allowed[1:] &= torch.isfinite(conf_sorted) | (conf_sorted > 0)  # a -inf row stays with the teacher
    top = conf_sorted[0]
    above = torch.nextafter(top, torch.tensor(math.inf, dtype=top.dtype))  # just above the highest: k = 0
    thresholds = torch.cat([above[None], conf_sorted]).double()  # (N + 1,)
    return _Sorted(thresholds, (kept + rest) / n, allowed, float(teacher.mean()), float(student.mean()))


def _relative(score: float, teacher_score: float) -> float:
    return score / teacher_score if teacher_score > 0 else 1.0


def curve(confidence: Tensor, student_ok: Tensor, teacher_ok: Tensor) -> list[Point]:
    """Every threshold worth trying, from the teacher answering everything to the student answering every row it may.

    confidence: (N,) float (-inf: never kept); student_ok, teacher_ok: (N,) bool."""
    table, n = _sorted(confidence, student_ok, teacher_ok), int(confidence.numel())
    return [
        Point(
            threshold=float(table.thresholds[k]),
            escalated=(n - k) / n,
            score=float(table.scores[k]),
            relative=_relative(float(table.scores[k]), table.teacher_score),
        )
        for k in torch.nonzero(table.allowed).flatten().tolist()
    ]


def choose(confidence: Tensor, student_ok: Tensor, teacher_ok: Tensor, target: float) -> Choice:
    """The lowest threshold (the fewest rows escalated) whose score reaches `target` x the teacher's score; k = 0
    (the teacher answers everything) always does."""
    table, n = _sorted(confidence, student_ok, teacher_ok), int(confidence.numel())
    feasible = table.allowed & (table.scores >= target * table.teacher_score - TOLERANCE)  # (N + 1,)
    feasible[0] = True
    best = int(torch.nonzero(feasible).flatten().max())
    score = float(table.scores[best])
    return Choice(
        threshold=float(table.thresholds[best]),
        escalation_rate=(n - best) / n,
        score=score,
        relative=_relative(score, table.teacher_score),
        student_score=table.student_score,
        teacher_score=table.teacher_score,
        target=target,
        rows=n,
    )


def thin(points: list[Point], count: int) -> list[Point]:
    """At most `count` points of a curve, evenly spread over its escalation shares, the ends kept."""
    if len(points) <= count:
        return points
    picks = torch.linspace(0, len(points) - 1, count).round().long().unique().tolist()
    return [points[i] for i in picks]
