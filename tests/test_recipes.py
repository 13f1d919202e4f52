import numpy as np
import pytest
import torch
from pydantic import ValidationError

from distill.classify import Task, _alone_train, task_settings
from distill.data import ArrayDataset
from distill.recipes import digits, mnist1d
from distill.recipes.digits import DigitsConfig
from distill.recipes.mnist1d import Mnist1dConfig


def test_settings_given_in_part_keep_the_recipe_defaults():
    """Loss settings merge one by one with the recipe's, and the shortcuts set the nested keys they stand for."""
    config = Mnist1dConfig.model_validate({"loss": {"alpha": 0.5}, "student_width": 64, "epochs": 3})
    default = Mnist1dConfig()
    assert config.loss.temperature == default.loss.temperature == 2.0 and config.loss.alpha == 0.5
    assert config.student.width == 64 and config.student.family == "mlp" and config.student.depth == 2
    assert config.student_train.epochs == 3 and config.student_train.lr == default.student_train.lr == 3e-2
    assert config.teacher_train == default.teacher_train and config.teacher == default.teacher
    assert DigitsConfig().loss.temperature == 4.0 and DigitsConfig().teacher.family == "cnn2d"
    settings = task_settings(config)
    assert settings["student"] == config.student and settings["loss"] == config.loss and settings["teachers"] == 1


def test_mnist1d_transfer_set_is_deterministic_and_cached(tmp_path):
    first = mnist1d.transfer_inputs(300, seed=1, store=tmp_path, workers=1)
    assert first.shape == (300, 40) and first.dtype == np.float32
    assert list((tmp_path / "mnist1d").glob("transfer-*.npy"))
    fresh = mnist1d.transfer_inputs(300, seed=1, store=None, workers=1)
    assert np.array_equal(first, fresh)
    assert not np.array_equal(first, mnist1d.transfer_inputs(300, seed=2, store=None, workers=1))
    state = np.random.get_state()[1].copy()
    mnist1d.transfer_inputs(10, seed=3, store=None, workers=1)
    assert np.array_equal(state, np.random.get_state()[1])  # numpy's global generator is left alone


def test_mnist1d_task_uses_the_standard_split(tmp_path):
    task = mnist1d.task(Mnist1dConfig(transfer_size=100), tmp_path)
    assert len(task.train) == 4000 and len(task.test) == 1000
    assert task.train.input_shape == (40,) and task.transfer.labeled == 0


def test_digits_shifts_and_noisy_copies():
    images = torch.zeros(1, 8, 8)
    images[0, 4, 4] = 1.0
    copies = digits.shifted(images)
    assert copies.shape == (9, 8, 8)
    peaks = {tuple((c == 1).nonzero()[0].tolist()) for c in copies}
    assert peaks == {(4 + dy, 4 + dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)}
    noisy = digits.noisy_copies(images, 50, torch.Generator().manual_seed(0), sigma=0.1)
    assert noisy.shape == (50, 8, 8) and 0.05 < float((noisy - images).std()) < 0.15


def _toy_task(**settings):
    data = ArrayDataset(torch.zeros(100, 4), torch.zeros(100, dtype=torch.long))
    config = Mnist1dConfig.model_validate(settings)
    return Task(name="toy", description="", train=data, test=data, transfer=None, num_classes=2,
                **task_settings(config))  # fmt: skip


def test_student_alone_trains_at_its_own_learning_rate_and_at_least_as_many_steps():
    """The baseline takes `alone_lr` (the recipe's 0.01 beside the distilled student's 0.03), or the student's own
    learning rate when unset, in its own batches, for at least the distilled student's optimizer steps."""
    data = ArrayDataset(torch.zeros(4400, 4), torch.zeros(4400, dtype=torch.long))  # labeled + transfer rows
    task = _toy_task()
    alone = _alone_train(task, data)
    assert (alone.lr, alone.batch_size) == (0.01, 32) and task.student_train.lr == 0.03
    assert alone.epochs * 4 >= 30 * 9  # 4 batches of 32 per epoch over 100 rows; 9 of 512 over 4,400
    assert _alone_train(_toy_task(alone_lr=None), data).lr == 0.03
    assert _alone_train(_toy_task(alone_lr=0.002), data).lr == 0.002
    own = {"lr", "batch_size", "epochs"}
    assert alone.model_dump(exclude=own) == task.student_train.model_dump(exclude=own)


@pytest.mark.parametrize("value", [0, -0.01, float("inf"), float("nan"), "fast"])
def test_alone_lr_refuses_what_is_not_a_positive_finite_rate(value):
    with pytest.raises(ValidationError, match="alone_lr"):
        Mnist1dConfig.model_validate({"alone_lr": value})
