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

Reaching the target on the validation rows is not reaching it on the next requests: the k chosen on a point estimate
falls short about half the time (one validation row in a thousand is a tenth of a point). So the target must hold
for a one-sided lower confidence bound at level `assurance` (0.95 by default). Per row, the cascade's margin over
the target is

    d_i = (s_i if row i is kept else r_i) - target * r_i         score_k - target * teacher = mean_i d_i

and k qualifies when mean(d) - z * sd(d) / sqrt(N) >= 0, z the standard normal quantile at `assurance` (the
paired normal approximation: the teacher's and the cascade's answers are scored on the same rows, so only the kept
rows where the two differ add variance). `assurance` 0.5 (z = 0) is the point estimate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist

import torch
from torch import Tensor

TOLERANCE = 1e-12  # a score that reaches the target up to rounding counts as reaching it
ASSURANCE = 0.95  # the level of the lower confidence bound that must reach the target


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
    assurance: float  # the level of the lower bound that reached the target
    margin: float  # z * sd(d) / sqrt(N) at the threshold: score - margin >= target x teacher_score


@dataclass(frozen=True)
class _Sorted:
    thresholds: Tensor  # (N + 1,) the threshold that keeps the k most confident rows, k = 0..N
    scores: Tensor  # (N + 1,) float64
    allowed: Tensor  # (N + 1,) bool: k is a possible split
    student: Tensor  # (N,) float64 s_i, most confident first
    teacher: Tensor  # (N,) float64 r_i, in the same order
    teacher_score: float
    student_score: float


def _split_sums(kept: Tensor, sent: Tensor) -> Tensor:
    """(N + 1,) for every k: the sum of `kept` over the k first rows plus the sum of `sent` over the others.

    kept, sent: (N,) per-row values of a row the student keeps and of a row sent to the teacher."""
    zero = torch.zeros(1, dtype=kept.dtype)
    return torch.cat([zero, kept.cumsum(0)]) + torch.cat([zero, sent.flip(0).cumsum(0)]).flip(0)


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
    right = _split_sums(student, teacher)  # (N + 1,) right answers: the student's k rows, the teacher's the rest
    allowed = torch.ones(n + 1, dtype=torch.bool)  # (N + 1,)
    allowed[1:n] = conf_sorted[:-1] != conf_sorted[1:]
    allowed[1:] &= torch.isfinite(conf_sorted) | (conf_sorted > 0)  # a -inf row stays with the teacher
    top = conf_sorted[0]
    above = torch.nextafter(top, torch.tensor(math.inf, dtype=top.dtype))  # just above the highest: k = 0
    thresholds = torch.cat([above[None], conf_sorted]).double()  # (N + 1,)
    return _Sorted(thresholds, right / n, allowed, student, teacher, float(teacher.mean()), float(student.mean()))


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


def _margins(table: _Sorted, target: float, assurance: float) -> Tensor:
    """(N + 1,) z * sd(d) / sqrt(N) for every k (the module's docstring), sd from the sums of d and d^2."""
    n = int(table.student.numel())
    z = NormalDist().inv_cdf(assurance)
    if z == 0 or n < 2:
        return torch.zeros(n + 1, dtype=torch.float64)
    kept_d = table.student - target * table.teacher  # (N,) d_i of a kept row
    sent_d = (1 - target) * table.teacher  # (N,) d_i of an escalated row
    sums, squares = _split_sums(kept_d, sent_d), _split_sums(kept_d**2, sent_d**2)  # (N + 1,), (N + 1,)
    variance = (squares - sums**2 / n) / (n - 1)  # (N + 1,) sample variance of d
    rounding = 64 * torch.finfo(torch.float64).eps * squares / (n - 1)  # (N + 1,) what the subtraction can leave
    variance = torch.where(variance > rounding, variance, torch.zeros_like(variance))  # rows alike: exactly 0
    return z * (variance / n).sqrt()


def choose(
    confidence: Tensor, student_ok: Tensor, teacher_ok: Tensor, target: float, assurance: float = ASSURANCE
) -> Choice:
    """The lowest threshold (the fewest rows escalated) whose score reaches `target` x the teacher's score with
    probability `assurance` (the lower bound of the module's docstring); k = 0 (the teacher answers everything)
    always qualifies."""
    if not 0 < assurance < 1:
        raise ValueError(f"assurance must lie in (0, 1), not {assurance}")
    table, n = _sorted(confidence, student_ok, teacher_ok), int(confidence.numel())
    margins = _margins(table, target, assurance)  # (N + 1,)
    feasible = table.allowed & (table.scores - margins >= target * table.teacher_score - TOLERANCE)  # (N + 1,)
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
        assurance=assurance,
        margin=float(margins[best]),
    )


def thin(points: list[Point], count: int) -> list[Point]:
    """At most `count` points of a curve, evenly spread over its escalation shares, the ends kept."""
    if len(points) <= count:
        return points
    picks = torch.linspace(0, len(points) - 1, count).round().long().unique().tolist()
    return [points[i] for i in picks]
