"""The cascade's threshold chosen for a target with a lower confidence bound (`distill.cascade_curve.choose`'s
`assurance`): what it buys on requests the validation rows did not contain, and the values it refuses."""

from __future__ import annotations

import pytest
import torch

from distill import cascade_curve
from distill.serve import CascadeSetup, TeacherEndpoint

TEACHER = 0.9  # the teacher's accuracy on every request


def true_relative(threshold: float) -> float:
    """The cascade's expected accuracy over the whole population, as a share of the teacher's, when requests of
    confidence c ~ U(0, 1) below `threshold` go to the teacher and the student is right with probability
    0.55 + 0.45 c: (0.9 t + int_t^1 (0.55 + 0.45 c) dc) / 0.9."""
    t = min(max(threshold, 0.0), 1.0)
    return (TEACHER * t + 0.55 * (1 - t) + 0.225 * (1 - t * t)) / TEACHER


def draw(generator: torch.Generator, rows: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    confidence = torch.rand(rows, generator=generator, dtype=torch.float64)  # (N,)
    student_ok = torch.rand(rows, generator=generator, dtype=torch.float64) < 0.55 + 0.45 * confidence  # (N,)
    teacher_ok = torch.rand(rows, generator=generator, dtype=torch.float64) < TEACHER  # (N,)
    return confidence, student_ok, teacher_ok


def test_the_bound_keeps_the_target_beyond_the_validation_rows_where_the_point_estimate_does_not():
    """200 validation sets of 1,000 rows from one population, target 98 % of the teacher's accuracy: the threshold
    chosen on the point estimate falls short of it on the population about half the time, the one chosen at 95 %
    confidence about one time in twenty, for a few more escalations."""
    torch.set_num_threads(1)
    generator = torch.Generator().manual_seed(0)
    short = {0.5: 0, 0.95: 0}
    escalated = {0.5: 0.0, 0.95: 0.0}
    for _ in range(200):
        rows = draw(generator, 1000)
        for assurance in short:
            choice = cascade_curve.choose(*rows, target=0.98, assurance=assurance)
            short[assurance] += true_relative(choice.threshold) < 0.98
            escalated[assurance] += choice.escalation_rate / 200
    assert short[0.5] >= 60 and short[0.95] <= 20, short
    assert escalated[0.5] < escalated[0.95] < escalated[0.5] + 0.2, escalated


def test_the_margin_shrinks_with_more_validation_rows():
    generator = torch.Generator().manual_seed(1)
    margins = [cascade_curve.choose(*draw(generator, rows), target=0.98).margin for rows in (250, 4000)]
    assert 0 < margins[1] < margins[0] / 2  # about 1 / sqrt(16) of it


def test_identical_rows_have_no_margin():
    """Every kept row agrees with the teacher (target 1): no spread, the bound is the estimate, not a rounding
    error above it that would send everything to the teacher."""
    confidence = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.5])
    agree = torch.tensor([True, True, True, False, False])
    choice = cascade_curve.choose(confidence, agree, torch.ones(5, dtype=torch.bool), target=1.0)
    assert choice.margin == 0.0 and choice.escalation_rate == pytest.approx(0.4)


@pytest.mark.parametrize("assurance", [0.0, 1.0, -0.5, 1.5])
def test_an_assurance_outside_zero_one_is_refused(assurance):
    ones = torch.ones(3, dtype=torch.bool)
    with pytest.raises(ValueError, match="assurance must lie in"):
        cascade_curve.choose(torch.rand(3), ones, ones, 0.9, assurance)
    with pytest.raises(ValueError, match="assurance must lie in"):
        CascadeSetup(teacher=TeacherEndpoint("http://127.0.0.1:9/v1", "t"), threshold=0.5, assurance=assurance)
