"""The cost of a training step: what the loop does per step besides the model's own work (issue 19)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import distill
from conftest import blobs, mlp
from distill.config import TrainConfig
from distill.train import train

torch.set_num_threads(1)


def _dropout_mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 4))


def test_steps_seed_dropout_without_torch_manual_seed(monkeypatch):
    """torch.manual_seed also seeds every CUDA device (queued with a stack trace when there is none): a third of a
    small student's step. The step seeds the generators it draws from, and dropout stays reproducible."""
    data = blobs(128)
    config = TrainConfig(epochs=2, batch_size=32, seed=3)
    reference = train(_dropout_mlp(), data, config).model.state_dict()

    def refused(seed: int) -> None:
        raise AssertionError("torch.manual_seed called inside a training step")

    model = _dropout_mlp()
    monkeypatch.setattr(torch, "manual_seed", refused)
    again = train(model, data, config).model.state_dict()
    for name, value in reference.items():
        assert torch.equal(value, again[name]), name


def test_the_python_api_does_not_clip_by_default_and_train_does(monkeypatch):
    calls: list[float] = []
    clip = torch.nn.utils.clip_grad_norm_

    def counted(parameters, max_norm, *args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(max_norm)
        return clip(parameters, max_norm, *args, **kwargs)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", counted)
    data = blobs(64)
    distill.distill(mlp(seed=2), mlp(seed=3), (data.inputs, data.labels), epochs=1, batch_size=32)
    assert calls == []
    train(mlp(seed=3), data, TrainConfig(epochs=1, batch_size=32))
    assert calls == [1.0, 1.0]


@pytest.mark.parametrize("accumulation", [1, 2])
def test_a_batch_without_labels_trains_on_the_soft_targets_alone(accumulation):
    """Rows without labels (a transfer set): `ce` is zero on a batch with none, with or without accumulation."""
    data = blobs(64)
    unlabeled = (data.inputs, torch.full((64,), -100))
    config = TrainConfig(epochs=1, batch_size=16, grad_accum_steps=accumulation, grad_clip=None)
    result = distill.distill(mlp(seed=2), mlp(seed=3), unlabeled, train_config=config)
    assert result.final["ce"] == 0.0 and result.final["kd"] > 0
