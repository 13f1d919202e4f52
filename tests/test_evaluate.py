import math

import pytest
import torch

from conftest import mlp
from distill import evaluate as ev


def test_accuracy_agreement_and_kl():
    logits = torch.tensor([[2.0, 0.0], [0.0, 2.0], [2.0, 0.0]])
    assert ev.accuracy(logits, torch.tensor([0, 1, 1])) == pytest.approx(2 / 3)
    assert ev.agreement(logits, logits.flip(-1)) == 0.0
    assert ev.kl_to_teacher(logits, logits) == pytest.approx(0.0, abs=1e-7)
    assert ev.kl_to_teacher(logits, logits.flip(-1)) > 0


def test_ece_is_zero_for_perfect_calibration_and_large_for_overconfidence():
    # 100 rows at confidence 0.8, 80 of them right: perfectly calibrated.
    p = torch.tensor([0.8, 0.2]).log().expand(100, 2)
    labels = torch.tensor([0] * 80 + [1] * 20)
    table = ev.calibration(p, labels)
    assert table.ece == pytest.approx(0.0, abs=1e-6)
    assert sum(table.count) == 100
    overconfident = torch.tensor([0.99, 0.01]).log().expand(100, 2)
    assert ev.calibration(overconfident, labels).ece == pytest.approx(0.19, abs=1e-4)


def test_gap_closed():
    assert ev.gap_closed(0.85, 0.68, 0.94) == pytest.approx((0.85 - 0.68) / (0.94 - 0.68))
    assert ev.gap_closed(0.9, 0.9, 0.9) is None


def test_measure_speed_side_by_side():
    small, big = mlp(width=4), mlp(width=2048)
    speed = ev.measure_speed(
        {"big": big, "small": small}, *ev.example_inputs(torch.randn(8)), rounds=3, min_seconds=0.01
    )
    assert set(speed) == {"big", "small"}
    assert all(s.latency_ms > 0 and math.isfinite(s.throughput) for s in speed.values())
    assert speed["small"].throughput > speed["big"].throughput
