import numpy as np
import torch

from distill.config import ClassifyRunConfig, LossConfig
from distill.recipes import digits, mnist1d
from distill.recipes.classify import resolve_specs


def test_loss_settings_merge_one_by_one_with_the_recipe_defaults():
    config = ClassifyRunConfig.model_validate({"loss": {"alpha": 0.5}, "student_width": 64, "epochs": 3})
    specs = resolve_specs(
        config,
        mnist1d.TEACHER,
        mnist1d.STUDENT,
        mnist1d.TEACHER_TRAIN,
        mnist1d.STUDENT_TRAIN,
        LossConfig(temperature=4.0, alpha=0.9),
    )
    assert specs["loss"].temperature == 4.0 and specs["loss"].alpha == 0.5
    assert specs["student"].width == 64 and specs["student"].family == "mlp"
    assert specs["student_train"].epochs == 3 and specs["teacher_train"] == mnist1d.TEACHER_TRAIN


def test_mnist1d_transfer_set_is_deterministic_and_cached(tmp_path):
    first = mnist1d.transfer_inputs(300, seed=1, cache_dir=tmp_path, workers=1)
    assert first.shape == (300, 40) and first.dtype == np.float32
    assert list((tmp_path / "mnist1d").glob("transfer-*.npy"))
    fresh = mnist1d.transfer_inputs(300, seed=1, cache_dir=None, workers=1)
    assert np.array_equal(first, fresh)
    assert not np.array_equal(first, mnist1d.transfer_inputs(300, seed=2, cache_dir=None, workers=1))
    state = np.random.get_state()[1].copy()
    mnist1d.transfer_inputs(10, seed=3, cache_dir=None, workers=1)
    assert np.array_equal(state, np.random.get_state()[1])  # numpy's global generator is left alone


def test_mnist1d_problem_uses_the_standard_split(tmp_path):
    problem = mnist1d.problem(ClassifyRunConfig(transfer_size=100), tmp_path)
    assert len(problem.train) == 4000 and len(problem.test) == 1000
    assert problem.train.input_shape == (40,) and problem.transfer.labeled == 0


def test_digits_shifts_and_noisy_copies():
    images = torch.zeros(1, 8, 8)
    images[0, 4, 4] = 1.0
    copies = digits.shifted(images)
    assert copies.shape == (9, 8, 8)
    peaks = {tuple((c == 1).nonzero()[0].tolist()) for c in copies}
    assert peaks == {(4 + dy, 4 + dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)}
    noisy = digits.noisy_copies(images, 50, torch.Generator().manual_seed(0), sigma=0.1)
    assert noisy.shape == (50, 8, 8) and 0.05 < float((noisy - images).std()) < 0.15
