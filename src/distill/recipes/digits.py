"""scikit-learn's bundled 8x8 digits (1,797 images): a 2-D CNN teacher distilled into a small MLP.

The teacher trains on the labeled images and their copies shifted by one pixel (a teacher may be as expensive to
train as one likes). The transfer set is new inputs from the same distribution, generated without labels: noisy
copies of the training images (Gaussian pixel noise, sigma 0.1), which only the teacher labels. The test split is a
fixed 500 images.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field

from distill import report
from distill.classify import FLAGS, ClassifyConfig, Task, run_classification, task_settings
from distill.config import LossConfig, ModelSpec, Rows, TrainConfig
from distill.data import IGNORE, ArrayDataset
from distill.errors import DistillError
from distill.recipes.recipe import Recipe
from distill.stages import RunContext

NOISE = 0.1
TEST_ROWS = 500


def shifted(images: torch.Tensor) -> torch.Tensor:
    """The images and their 8 copies shifted by one pixel in every direction (zeros enter at the edge).
    (N, 8, 8) -> (9 N, 8, 8), the original first."""
    padded = torch.nn.functional.pad(images, (1, 1, 1, 1))  # (N, 10, 10)
    copies = [images]
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            if dy or dx:
                copies.append(torch.roll(padded, (dy, dx), dims=(1, 2))[:, 1:9, 1:9])
    return torch.cat(copies)


def noisy_copies(images: torch.Tensor, count: int, generator: torch.Generator, sigma: float = NOISE) -> torch.Tensor:
    """`count` new inputs (count, 8, 8): random images plus Gaussian pixel noise of standard deviation `sigma`."""
    source = images[torch.randint(len(images), (count,), generator=generator)]  # (count, 8, 8)
    return source + sigma * torch.randn(source.shape, generator=generator)


class DigitsConfig(ClassifyConfig):
    """`distill run --recipe digits`: a 2-D CNN teacher, an MLP student, 10,000 noisy copies as transfer set."""

    recipe: Literal["digits"] = "digits"
    teacher: ModelSpec = Field(
        default_factory=lambda: ModelSpec(family="cnn2d", width=32, depth=3, head=128, dropout=0.2)
    )
    student: ModelSpec = Field(default_factory=lambda: ModelSpec(family="mlp", width=32, depth=1))
    transfer_size: Rows = Field(10_000, description="noisy copies of the training images labeled by the teacher")
    loss: LossConfig = Field(default_factory=lambda: LossConfig(temperature=4.0, alpha=0.9))
    teacher_train: TrainConfig = Field(
        default_factory=lambda: TrainConfig(epochs=20, batch_size=128, lr=3e-3, weight_decay=0.05)
    )
    student_train: TrainConfig = Field(
        default_factory=lambda: TrainConfig(epochs=30, batch_size=128, lr=3e-3, weight_decay=0.01)
    )


def task(config: DigitsConfig) -> Task:
    """The digits task of a run config (the data ship with scikit-learn)."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise DistillError("the digits recipe needs scikit-learn: pip install scikit-learn") from None
    bunch = load_digits()
    images = torch.tensor(bunch.images, dtype=torch.float32) / 16.0  # (1797, 8, 8) in [0, 1]
    labels = torch.tensor(bunch.target, dtype=torch.long)
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(1234))  # a fixed split
    test_index, train_index = order[:TEST_ROWS], order[TEST_ROWS:]
    train_x, train_y = images[train_index], labels[train_index]
    if config.train_size is not None:
        if config.train_size > len(train_x):
            raise DistillError(f"train_size {config.train_size} is more than the {len(train_x)} labeled digits")
        train_x, train_y = train_x[: config.train_size], train_y[: config.train_size]
    size = config.transfer_size
    transfer = noisy_copies(train_x, size, torch.Generator().manual_seed(10_000 + config.seed))
    return Task(
        name="digits",
        description=(
            f"8x8 digits: {len(train_x)} labeled training images, {TEST_ROWS} test images, {size} unlabeled "
            f"transfer images (noisy copies, sigma {NOISE}); the teacher also trains on one-pixel shifts"
        ),
        train=ArrayDataset(train_x, train_y),
        test=ArrayDataset(images[test_index], labels[test_index]),
        transfer=ArrayDataset(transfer, torch.full((size,), IGNORE)),
        teacher_data=ArrayDataset(shifted(train_x), train_y.repeat(9)),
        num_classes=10,
        **task_settings(config),
    )


def run(config: DigitsConfig, context: RunContext) -> dict[str, Any]:
    context.reporter.stage("data", total=None)
    built = task(config)
    context.reporter.end()
    return run_classification(built, context)


RECIPE = Recipe(
    name="digits",
    summary="scikit-learn's 8x8 digits: a 2-D CNN teacher distilled into a small MLP with noisy copies as transfer set",
    config=DigitsConfig,
    run=run,
    report=report.classification_report,
    flags=FLAGS,
)
