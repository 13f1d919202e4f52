"""`distill train --config FILE.yaml`: a user's own arrays (CSV/TSV/NPZ) with the built-in model families.

With one or more saved teachers it runs the classification pipeline of the built-in recipes (student alone, student
distilled, report); without a teacher it trains a plain supervised model, which can then teach another run.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
from pydantic import Field, model_validator

from distill import evaluate, models, report
from distill.classify import Task, run_classification
from distill.config import Classes, Length, LossConfig, ModelSpec, Strict, TrainConfig, dump
from distill.data import ArrayDataset, check_labels, dataset_from_file, infer_num_classes
from distill.errors import DataError, ShapeMismatchError
from distill.model_card import student_folders, write_cards
from distill.stages import RunContext
from distill.train import train


class DataSpec(Strict):
    """A user's arrays: CSV/TSV with a header (features + a label column) or NPZ (features + labels arrays)."""

    train: Path
    test: Path | None = None
    transfer: Path | None = Field(None, description="unlabeled inputs for the teacher to label (label column optional)")
    label_column: str = Field("label", max_length=1_000)
    features_key: str = Field("x", max_length=1_000)
    labels_key: str = Field("y", max_length=1_000)
    num_classes: Classes | None = None
    test_fraction: Annotated[float, Field(gt=0, lt=1)] = Field(
        0.2, description="held out from train when no test file is given"
    )
    input_shape: list[Length] | None = Field(
        None, min_length=1, max_length=4, description="reshape flat features, e.g. [8, 8] for a 2-D CNN"
    )


class ArraysJobConfig(Strict):
    """`distill train --config FILE.yaml`: train a built-in student, distilled from a saved teacher if one is given.

    Without `teacher` this trains a plain supervised model (which can then be the teacher of another run).
    """

    data: DataSpec
    student: ModelSpec = ModelSpec()
    teacher: list[Path] = Field(
        default_factory=list, max_length=32, description="saved model directories; several = ensemble"
    )
    ensemble: Literal["mean", "geometric"] = "mean"
    loss: LossConfig = LossConfig()
    train: TrainConfig = TrainConfig()
    compare_alone: bool = Field(True, description="also train the same student without a teacher, for the report")

    @model_validator(mode="before")
    @classmethod
    def _teacher_as_list(cls, values: Any) -> Any:
        if isinstance(values, dict) and "teacher" in values:
            teacher = values["teacher"]
            if teacher is None:
                values = {**values, "teacher": []}
            elif isinstance(teacher, (str, Path)):
                values = {**values, "teacher": [teacher]}
        return values


def _load_data(
    config: ArraysJobConfig, num_classes: int | None
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


def run_train_arrays(config: ArraysJobConfig, context: RunContext) -> dict[str, Any]:
    """Run the job into `context.output` (metrics.json, the report, the model or the student); return the metrics."""
    started = time.perf_counter()
    output = context.output
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
        metrics = _supervised(config, train_set, test_set, classes, context)
    else:
        task = Task(
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
            loss=config.loss,
            alone_batch_size=config.train.batch_size,
            teachers=len(config.teacher),
            ensemble=config.ensemble,
            seed=config.train.seed,
            pretrained=list(config.teacher),
        )
        metrics = run_classification(task, context)
    metrics["seconds"] = time.perf_counter() - started
    rendered = report_of(metrics)
    report.write(rendered, output, metrics)
    (output / "config.yaml").write_text(dump(config))
    folders = [output / "model"] if not config.teacher else student_folders(output)
    write_cards(folders, rendered, dump(config), metrics)
    return metrics


def _supervised(
    config: ArraysJobConfig, train_set: ArrayDataset, test_set: ArrayDataset, classes: int, context: RunContext
) -> dict[str, Any]:
    """A plain model trained on the labels alone (no teacher), saved to `output/model`, scored and reported."""
    output = context.output
    torch.manual_seed(config.train.seed)
    model = models.build(config.student, train_set.input_shape, classes)
    result = train(
        model,
        train_set,
        config.train,
        evaluate=lambda m: {"test_accuracy": evaluate.accuracy(evaluate.predict(m, test_set.inputs), test_set.labels)},
        checkpoint_dir=output / "checkpoints" / "model",
        resume=context.resume,
        reporter=context.reporter,
        name="model",
    )
    weights = models.save(result.model, output / "model", config.student, train_set.input_shape, classes)
    logits = evaluate.predict(result.model, test_set.inputs)
    speed = evaluate.measure_speed({"model": result.model}, *evaluate.example_inputs(test_set.inputs[0]))["model"]
    metrics: dict[str, Any] = {
        "recipe": "train",
        "description": f"{config.data.train.name}: {len(train_set)} training rows, {len(test_set)} test rows",
        "model": {
            "accuracy": evaluate.accuracy(logits, test_set.labels),
            "params": models.count_parameters(result.model),
            "size_bytes": weights.stat().st_size,
            "latency_ms": speed.latency_ms,
            "throughput": speed.throughput,
            "ece": evaluate.calibration(logits, test_set.labels).ece,
            "train_seconds": result.seconds,
            "path": str(output / "model"),
            "family": config.student.family,
        },
        "history": {"model": result.history},
    }
    (output / "history.json").write_text(json.dumps(result.history))
    return metrics


def report_of(metrics: dict[str, Any]) -> report.Report:
    """The report of a `distill train` run: the classification report with a teacher, else the trained model's."""
    if "model" not in metrics:
        return report.classification_report(metrics)
    m, saved = metrics["model"], metrics["model"]["path"]
    header = ["model", "test accuracy", "parameters", "size", "latency ms (batch 1)", "rows/s (batch 256)", "ECE"]
    row = [m.get("family", "model"), report.pct(m["accuracy"]), report.count(m["params"]), report.size(m["size_bytes"]),
           report.num(m["latency_ms"]), report.count(round(m["throughput"])), report.pct(m["ece"])]  # fmt: skip
    return report.Report(
        title="distill report: supervised training",
        description=metrics["description"],
        summary=[f"Saved to {saved}; use it as a teacher with `teacher: {saved}`."],
        tables=[report.Table("Model", header, [row])],
        images={"learning_curves.png": report.plots.learning_curves(metrics["history"])},
    )
