"""MNIST-1D (Greydanus 2020): a 1-D CNN teacher distilled into a small MLP, with freshly generated transfer inputs.

The data set is generated offline by the `mnist1d` package (`make_dataset`; never its downloading `get_dataset`):
the standard 4,000 / 1,000 split from seed 42, and a transfer set of new signals from other seeds, whose labels are
thrown away so that only the teacher labels them. The data set's authors report 94 % test accuracy for a CNN and
68 % for an MLP trained on the labeled split alone.
"""

from __future__ import annotations

import hashlib
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field

from distill import report
from distill.classify import FLAGS, ClassifyConfig, Task, run_classification, task_settings
from distill.config import LearningRate, LossConfig, ModelSpec, Rows, TrainConfig
from distill.data import ArrayDataset, load_checked_array, save_checked_array
from distill.errors import DistillError
from distill.recipes.recipe import Recipe
from distill.stages import RunContext

SPLIT_SEED = 42  # the data set's standard split
CHUNK = 5_000  # signals generated per worker task


def _generate(num_samples: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """`num_samples` signals (N, 40) float32 and their labels from mnist1d's generator with `seed`, all in one split."""
    from mnist1d.data import get_dataset_args, make_dataset

    state = np.random.get_state()
    try:
        args = get_dataset_args()
        args.num_samples, args.seed, args.train_split = num_samples, seed, 1.0
        data = make_dataset(args)
    finally:
        np.random.set_state(state)  # make_dataset reseeds numpy's global generator
    return data["x"].astype(np.float32), data["y"].astype(np.int64)


def _standard_split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    from mnist1d.data import get_dataset_args, make_dataset

    state = np.random.get_state()
    try:
        args = get_dataset_args()
        args.seed = SPLIT_SEED
        data = make_dataset(args)
    finally:
        np.random.set_state(state)
    return (
        data["x"].astype(np.float32),
        data["y"].astype(np.int64),
        data["x_test"].astype(np.float32),
        data["y_test"].astype(np.int64),
    )


def transfer_inputs(size: int, seed: int, store: Path | None, workers: int = 2) -> np.ndarray:
    """`size` fresh MNIST-1D signals (labels discarded), generated in chunks by `workers` processes.

    Chunk i uses generator seed (10_000 + 1_000 * seed + i) mod 2^32, never the split's seed. Generation is
    deterministic, so the result is kept in `store` (when given) with its sha256 beside it and reused by later
    runs with the same seed and size; a kept file that fails its checksum is generated again and replaced.
    """
    if size == 0:
        return np.zeros((0, 40), np.float32)
    key = hashlib.sha256(f"mnist1d-transfer-v1-{size}-{seed}-{CHUNK}".encode()).hexdigest()[:16]
    path = store / "mnist1d" / f"transfer-{key}.npy" if store is not None else None
    if path is not None:
        cached = load_checked_array(path)
        if cached is not None and cached.shape == (size, 40) and cached.dtype == np.float32:
            return cached
    sizes = [min(CHUNK, size - start) for start in range(0, size, CHUNK)]
    seeds = [(10_000 + 1_000 * seed + i) % 2**32 for i in range(len(sizes))]  # numpy's seeds are 32-bit
    if workers > 1 and len(sizes) > 1:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            parts = list(pool.map(_generate, sizes, seeds))
    else:
        parts = [_generate(n, s) for n, s in zip(sizes, seeds)]
    inputs = np.concatenate([p[0] for p in parts])
    if path is not None:
        save_checked_array(path, inputs)
    return inputs


class Mnist1dConfig(ClassifyConfig):
    """`distill run` (the default recipe): a 1-D CNN teacher, an MLP student, 40,000 generated transfer signals."""

    recipe: Literal["mnist1d"] = "mnist1d"
    teacher: ModelSpec = Field(
        default_factory=lambda: ModelSpec(family="cnn1d", width=64, depth=4, head=256, dropout=0.3)
    )
    student: ModelSpec = Field(default_factory=lambda: ModelSpec(family="mlp", width=256, depth=2))
    transfer_size: Rows = Field(40_000, description="freshly generated signals labeled by the teacher")
    loss: LossConfig = Field(default_factory=lambda: LossConfig(temperature=2.0, alpha=0.9))
    teacher_train: TrainConfig = Field(
        default_factory=lambda: TrainConfig(epochs=30, batch_size=128, lr=3e-3, weight_decay=0.05)
    )
    # Learning rates: the best means on fresh validation signals over seeds 0-5 (benchmarks/mnist1d_lr.py); the
    # student alone, in batches of 32 over the 4,000 labeled signals, wants a smaller one than the distilled student.
    student_train: TrainConfig = Field(
        default_factory=lambda: TrainConfig(epochs=30, batch_size=512, lr=3e-2, weight_decay=0.01)
    )
    alone_lr: LearningRate | None = 1e-2


def task(config: Mnist1dConfig, store: Path | None = None) -> Task:
    """The MNIST-1D task of a run config; generated transfer signals are kept in `store` when given."""
    try:
        import mnist1d  # noqa: F401
    except ImportError:
        raise DistillError("the mnist1d recipe needs the package mnist1d: pip install mnist1d") from None
    x, y, x_test, y_test = _standard_split()
    if config.train_size is not None:
        if config.train_size > len(x):
            raise DistillError(f"train_size {config.train_size} is more than the {len(x)} labeled MNIST-1D signals")
        x, y = x[: config.train_size], y[: config.train_size]
    transfer = transfer_inputs(config.transfer_size, config.seed, store)
    return Task(
        name="mnist1d",
        description=(
            f"MNIST-1D: {len(x)} labeled training signals, {len(x_test)} test signals, "
            f"{len(transfer)} freshly generated unlabeled transfer signals"
        ),
        train=ArrayDataset(torch.from_numpy(x), torch.from_numpy(y)),
        test=ArrayDataset(torch.from_numpy(x_test), torch.from_numpy(y_test)),
        transfer=ArrayDataset(torch.from_numpy(transfer), torch.full((len(transfer),), -100)),
        num_classes=10,
        **task_settings(config),
    )


def run(config: Mnist1dConfig, context: RunContext) -> dict[str, Any]:
    context.reporter.stage("data", total=None)
    built = task(config, context.store)
    context.reporter.end()
    return run_classification(built, context)


RECIPE = Recipe(
    name="mnist1d",
    summary="MNIST-1D (generated offline): a 1-D CNN teacher distilled into a small MLP with generated transfer signals",
    config=Mnist1dConfig,
    run=run,
    report=report.classification_report,
    flags=FLAGS,
)
