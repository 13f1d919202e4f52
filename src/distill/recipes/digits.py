"""scikit-learn's bundled 8x8 digits (1,797 images): a 2-D CNN teacher distilled into a small MLP.

The transfer set is made of new images generated from the training images (a random shift of up to one pixel and
pixel noise, as a camera would vary them); their labels are never used, only the teacher's soft targets.
"""

from __future__ import annotations

from pathlib import Path

import torch

from distill.config import ClassifyRunConfig, ModelSpec, TrainConfig
from distill.data import IGNORE, ArrayDataset
from distill.errors import DistillError
from distill.recipes.classify import Problem, resolve_specs

TEACHER = ModelSpec(family="cnn2d", width=32, depth=3, head=128, dropout=0.2)
STUDENT = ModelSpec(family="mlp", width=32, depth=1)
TEACHER_TRAIN = TrainConfig(epochs=40, batch_size=64, lr=3e-3, weight_decay=0.05)
STUDENT_TRAIN = TrainConfig(epochs=30, batch_size=128, lr=3e-3, weight_decay=0.01)
ALONE_BATCH = 64  # the student alone: smaller batches over its smaller data set
TRANSFER_SIZE = 10_000
TEST_ROWS = 500


def jitter(images: torch.Tensor, count: int, generator: torch.Generator) -> torch.Tensor:
    """`count` new images (count, 8, 8): random source images shifted by -1..1 pixels each way, plus noise."""
    source = images[torch.randint(len(images), (count,), generator=generator)]  # (count, 8, 8)
    padded = torch.nn.functional.pad(source, (1, 1, 1, 1))  # (count, 10, 10)
    dy = torch.randint(0, 3, (count,), generator=generator)
    dx = torch.randint(0, 3, (count,), generator=generator)
    rows = (dy[:, None] + torch.arange(8)[None, :])[:, :, None].expand(count, 8, 8)  # (count, 8, 8)
    cols = (dx[:, None] + torch.arange(8)[None, :])[:, None, :].expand(count, 8, 8)  # (count, 8, 8)
    shifted = padded[torch.arange(count)[:, None, None], rows, cols]  # (count, 8, 8)
    return shifted + 0.1 * torch.randn(shifted.shape, generator=generator)


def problem(config: ClassifyRunConfig, cache_dir: Path | None = None) -> Problem:
    """The digits problem for a run config (`cache_dir` is unused: the data ship with scikit-learn)."""
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
    size = TRANSFER_SIZE if config.transfer_size is None else config.transfer_size
    transfer = jitter(train_x, size, torch.Generator().manual_seed(10_000 + config.seed))
    return Problem(
        name="digits",
        description=(
            f"8x8 digits: {len(train_x)} labeled training images, {TEST_ROWS} test images, "
            f"{size} generated unlabeled transfer images (shifted and noisy copies)"
        ),
        train=ArrayDataset(train_x, train_y),
        test=ArrayDataset(images[test_index], labels[test_index]),
        transfer=ArrayDataset(transfer, torch.full((size,), IGNORE)),
        num_classes=10,
        **resolve_specs(config, TEACHER, STUDENT, TEACHER_TRAIN, STUDENT_TRAIN),
        alone_batch_size=ALONE_BATCH,
    )
