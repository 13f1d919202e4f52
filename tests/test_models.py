import pytest
import torch

from distill import models
from distill.config import ModelSpec
from distill.errors import DistillError


@pytest.mark.parametrize(
    "spec, shape",
    [
        (ModelSpec(family="mlp", width=16, depth=2), (40,)),
        (ModelSpec(family="cnn1d", width=8, depth=4, head=16, dropout=0.1), (40,)),
        (ModelSpec(family="cnn2d", width=8, depth=3, head=0), (8, 8)),
    ],
)
def test_build_save_load_round_trip(tmp_path, spec, shape):
    model = models.build(spec, shape, 10).eval()
    x = torch.randn(3, *shape)
    assert model(x).shape == (3, 10)
    models.save(model, tmp_path, spec, shape, 10)
    loaded, loaded_spec, loaded_shape, classes = models.load(tmp_path)
    assert loaded_spec == spec and loaded_shape == shape and classes == 10
    assert torch.allclose(loaded(x), model(x))
    assert models.count_parameters(loaded) == models.count_parameters(model)


def test_wrong_input_rank_and_bad_directories(tmp_path):
    with pytest.raises(DistillError, match="cnn2d needs 2-D"):
        models.build(ModelSpec(family="cnn2d"), (64,), 10)
    with pytest.raises(DistillError, match="not a saved distill model"):
        models.load(tmp_path)
    spec = ModelSpec(family="mlp", width=4, depth=1)
    models.save(models.build(spec, (3,), 2), tmp_path, spec, (3,), 2)
    (tmp_path / models.WEIGHTS).write_bytes(b"truncated")
    with pytest.raises(DistillError, match="cannot load weights"):
        models.load(tmp_path)
    (tmp_path / models.SPEC).write_text("{}")
    with pytest.raises(DistillError, match="malformed"):
        models.load(tmp_path)
