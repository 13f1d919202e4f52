import pytest
import torch

import distill
from conftest import blobs, mlp
from distill.config import TrainConfig
from distill.errors import ShapeMismatchError
from distill.train import train


def test_distill_any_module_pair_with_transfer_and_cache(tmp_path):
    data, test = blobs(300, seed=1), blobs(300, seed=2)
    teacher = mlp(width=64, seed=2)
    train(teacher, data, TrainConfig(epochs=10, batch_size=32, lr=1e-2))
    transfer = blobs(600, seed=3).inputs
    result = distill.distill(
        teacher,
        mlp(width=8, seed=4),
        (data.inputs, data.labels),
        transfer=transfer,
        test=(test.inputs, test.labels),
        epochs=5,
        batch_size=64,
        lr=1e-2,
        cache_dir=tmp_path / "cache",
    )
    assert (tmp_path / "cache" / "manifest.json").exists()
    assert result.final["test_accuracy"] > 0.9
    assert {"kd", "ce"} <= set(result.final)


def test_distill_from_an_ensemble_list():
    data = blobs(200)
    result = distill.distill([mlp(seed=1), mlp(seed=2), mlp(seed=3)], mlp(seed=4), data, epochs=1)
    assert result.steps == 1


def test_mismatched_widths_are_refused():
    with pytest.raises(ShapeMismatchError, match="5 outputs but the student has 4"):
        distill.distill(mlp(classes=5), mlp(), blobs(50), epochs=1)
    with pytest.raises(distill.DistillError):
        distill.distill(mlp(), mlp(), torch.zeros(3), epochs=1)
