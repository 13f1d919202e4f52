"""`distill train --config FILE.yaml`: a user's own arrays (CSV/TSV/NPZ) with the built-in model families.

With one or more saved teachers it runs the same pipeline as the built-in recipes (student alone, student distilled,
report); without a teacher it trains a plain supervised model, which can then teach another run.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

from distill import evaluate as ev
from distill import models, report
from distill.config import TrainJobConfig, dump
from distill.data import ArrayDataset, check_labels, dataset_from_file, infer_num_classes
from distill.errors import DataError, ShapeMismatchError
from distill.progress import NULL, Reporter
from distill.recipes.classify import Problem, finish, run_classification
from distill.train import train


def _load_data(
    config: TrainJobConfig, num_classes: int | None
) -> tuple[ArrayDataset, ArrayDataset, ArrayDataset | None, int]:
    spec = config.data
    shape = tuple(spec.input_shape) if spec.input_shape else None
    common: dict[str, Any] = {
        "input_shape": shape,
        "label_column": spec.label_column,
        "features_key": spec.features_key,
        "labels_key": spec.labels_key,
    }
    train_set = dataset_from_file(spec.train, **common)
    classes = num_classes or spec.num_classes or infer_num_classes(train_set.labels, str(spec.train))
    if spec.num_classes is not None and num_classes is not None and spec.num_classes != num_classes:
        raise ShapeMismatchError(
            f"data.num_classes is {spec.num_classes} but the teacher predicts {num_classes} classes"
        )
    check_labels(train_set.labels, classes, str(spec.train))
    if spec.test is not None:
        test_set = dataset_from_file(spec.test, **common)
        check_labels(test_set.labels, classes, str(spec.test))
        if test_set.input_shape != train_set.input_shape:
            raise DataError(
                f"{spec.test} has inputs of shape {test_set.input_shape}, train has {train_set.input_shape}"
            )
    else:
        test_set, train_set = _split(train_set, spec.test_fraction, config.train.seed, spec.train)
    transfer = None
    if spec.transfer is not None:
        transfer = dataset_from_file(spec.transfer, require_labels=False, **common).unlabeled()
        if transfer.input_shape != train_set.input_shape:
            raise DataError(
                f"{spec.transfer} has inputs of shape {transfer.input_shape}, train has {train_set.input_shape}"
            )
    return train_set, test_set, transfer, classes


def _split(data: ArrayDataset, fraction: float, seed: int, path: Path) -> tuple[ArrayDataset, ArrayDataset]:
    """(test, train): `fraction` of the rows (at least one) held out in an order fixed by `seed`; a DataError when
    either part would be empty or hold no labeled row."""
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))
    cut = max(1, int(round(fraction * len(data))))
    test_set, train_set = data.subset(order[:cut]), data.subset(order[cut:])
    if train_set.labeled == 0 or test_set.labeled == 0:
        raise DataError(
            f"{path} has {len(data)} row{'s' if len(data) != 1 else ''} ({data.labeled} labeled): holding out "
            f"test_fraction {fraction} leaves "
            f"{train_set.labeled} labeled rows to train on and {test_set.labeled} to test on; give more rows, "
            "another data.test_fraction, or a data.test file"
        )
    return test_set, train_set


def run_train_job(
    config: TrainJobConfig, output: Path, *, resume: bool = False, reporter: Reporter = NULL
) -> dict[str, Any]:
    """Run the job and write its outputs into `output`; return the metrics."""
    started = time.perf_counter()
    output.mkdir(parents=True, exist_ok=True)
    teacher_classes = None
    teacher_shape = None
    for directory in config.teacher:
        _, _, shape, classes = models.load(directory)
        if teacher_classes is not None and (classes != teacher_classes or shape != teacher_shape):
            raise ShapeMismatchError(f"teacher {directory} differs from the first teacher in input shape or classes")
        teacher_classes, teacher_shape = classes, shape
    train_set, test_set, transfer, classes = _load_data(config, teacher_classes)
    if teacher_shape is not None and teacher_shape != train_set.input_shape:
        raise ShapeMismatchError(
            f"the teacher takes inputs of shape {list(teacher_shape)} but the data has {list(train_set.input_shape)}; "
            "set data.input_shape"
        )
    if not config.teacher:
        metrics = _supervised(config, train_set, test_set, classes, output, resume, reporter)
    else:
        problem = Problem(
            name="train",
            description=(
                f"{config.data.train.name}: {len(train_set)} labeled training rows, {len(test_set)} test rows, "
                f"{len(transfer) if transfer is not None else 0} unlabeled transfer rows"
            ),
            train=train_set,
            test=test_set,
            transfer=transfer,
            num_classes=classes,
            teacher=config.student,  # unused: the teachers are loaded
            student=config.student,
            teacher_train=config.train,
            student_train=config.train,
            alone_batch_size=config.train.batch_size,
            loss=config.loss,
            pretrained=list(config.teacher),
        )
        metrics = run_classification(
            problem,
            teachers=len(config.teacher),
            ensemble=config.ensemble,
            seed=config.train.seed,
            output=output,
            resume=resume,
            reporter=reporter,
        )
        metrics["seconds"] = time.perf_counter() - started
        finish(metrics, output, dump(config))
    return metrics


def _supervised(
    config: TrainJobConfig,
    train_set: ArrayDataset,
    test_set: ArrayDataset,
    classes: int,
    output: Path,
    resume: bool,
    reporter: Reporter,
) -> dict[str, Any]:
    started = time.perf_counter()
    torch.manual_seed(config.train.seed)
    model = models.build(config.student, train_set.input_shape, classes)
    result = train(
        model,
        train_set,
        config.train,
        evaluate=lambda m: {"test_accuracy": ev.accuracy(ev.predict(m, test_set.inputs), test_set.labels)},
        checkpoint_dir=output / "checkpoints" / "model",
        resume=resume,
        reporter=reporter,
        name="model",
    )
    weights = models.save(result.model, output / "model", config.student, train_set.input_shape, classes)
    logits = ev.predict(result.model, test_set.inputs)
    speed = ev.measure_speed({"model": result.model}, *ev.example_inputs(test_set.inputs[0]))["model"]
    reliability = ev.calibration(logits, test_set.labels)
    metrics: dict[str, Any] = {
        "recipe": "train",
        "description": f"{config.data.train.name}: {len(train_set)} training rows, {len(test_set)} test rows",
        "model": {
            "accuracy": ev.accuracy(logits, test_set.labels),
            "params": models.count_parameters(result.model),
            "size_bytes": weights.stat().st_size,
            "latency_ms": speed.latency_ms,
            "throughput": speed.throughput,
            "ece": reliability.ece,
            "train_seconds": result.seconds,
            "path": str(output / "model"),
        },
        "history": {"model": result.history},
        "seconds": time.perf_counter() - started,
    }
    m = metrics["model"]
    table = report.Table(
        "Model",
        ["model", "test accuracy", "parameters", "size", "latency ms (batch 1)", "rows/s (batch 256)", "ECE"],
        [
            [
                config.student.family,
                report.pct(m["accuracy"]),
                report.count(m["params"]),
                report.size(m["size_bytes"]),
                report.num(m["latency_ms"]),
                report.count(round(m["throughput"])),
                report.pct(m["ece"]),
            ]
        ],
    )
    rendered = report.Report(
        title="distill report: supervised training",
        description=metrics["description"],
        summary=[f"Saved to {output / 'model'}; use it as a teacher with `teacher: {output / 'model'}`."],
        tables=[table],
        images={"learning_curves.png": report.plots.learning_curves(metrics["history"])},
    )
    report.write(rendered, output, metrics)
    (output / "config.yaml").write_text(dump(config))
    (output / "history.json").write_text(json.dumps(result.history))
    return metrics
