"""The `evaluate` job: a saved MLP/CNN (and optionally a teacher) scored on a labeled file, with a report.

Quality: accuracy and expected calibration error; with a teacher, its accuracy, top-1 agreement and KL(teacher ||
student). Cost: parameters, weights on disk, CPU latency at batch 1 and rows per second at batch 256, both models
timed side by side.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from pydantic import Field

from distill import evaluate, models, report
from distill.config import Strict
from distill.data import dataset_from_file
from distill.errors import ShapeMismatchError
from distill.progress import Reporter


class EvaluateJobConfig(Strict):
    """Score a saved MLP/CNN (and optionally its teacher) on a labeled CSV/TSV/NPZ file."""

    student: str = Field(
        max_length=1_000, description="the model to score: a finished job's model (job-... or job-.../NAME)"
    )
    teacher: str | None = Field(
        None, max_length=1_000, description="a teacher to compare with (agreement, KL), same refs"
    )
    data: Path = Field(description="labeled rows: CSV/TSV with a label column or NPZ (file-...)")
    label_column: str = Field("label", max_length=1_000)
    features_key: str = Field("x", max_length=1_000)
    labels_key: str = Field("y", max_length=1_000)


def evaluate_saved(config: EvaluateJobConfig, output: Path, reporter: Reporter) -> dict[str, Any]:
    """Score the model(s) on `config.data`; write metrics.json, report.md and report.html into `output`."""
    started = time.perf_counter()
    reporter.stage("evaluate", total=None)
    student, _, shape, classes = models.load(Path(config.student))
    data = dataset_from_file(
        config.data,
        num_classes=classes,
        input_shape=shape,
        label_column=config.label_column,
        features_key=config.features_key,
        labels_key=config.labels_key,
    )
    logits = evaluate.predict(student, data.inputs)
    reliability = evaluate.calibration(logits, data.labels)
    timed: dict[str, Any] = {"student": student}
    metrics: dict[str, Any] = {
        "recipe": "evaluate",
        "rows": len(data),
        "student": {
            "path": Path(config.student).name,
            "accuracy": evaluate.accuracy(logits, data.labels),
            "ece": reliability.ece,
            "params": models.count_parameters(student),
            "size_bytes": (Path(config.student) / models.WEIGHTS).stat().st_size,
        },
    }
    if config.teacher is not None:
        teacher, _, teacher_shape, teacher_classes = models.load(Path(config.teacher))
        if teacher_shape != shape or teacher_classes != classes:
            raise ShapeMismatchError(
                f"the teacher takes inputs {list(teacher_shape)} with {teacher_classes} classes, the student "
                f"{list(shape)} with {classes}"
            )
        teacher_logits = evaluate.predict(teacher, data.inputs)
        metrics["teacher"] = {
            "accuracy": evaluate.accuracy(teacher_logits, data.labels),
            "ece": evaluate.calibration(teacher_logits, data.labels).ece,
            "params": models.count_parameters(teacher),
            "size_bytes": (Path(config.teacher) / models.WEIGHTS).stat().st_size,
        }
        metrics["student"]["agreement"] = evaluate.agreement(logits, teacher_logits)
        metrics["student"]["kl_to_teacher"] = evaluate.kl_to_teacher(logits, teacher_logits)
        timed["teacher"] = teacher
    speed = evaluate.measure_speed(timed, *evaluate.example_inputs(data.inputs[0]))
    for name, measured in speed.items():
        metrics[name].update(latency_ms=measured.latency_ms, throughput=measured.throughput)
    metrics["seconds"] = time.perf_counter() - started
    reporter.end()
    report.write(_render(metrics), output, metrics)
    return metrics


def _render(metrics: dict[str, Any]) -> report.Report:
    header = ["model", "accuracy", "ECE", "agreement", "parameters", "size", "latency ms (batch 1)", "rows/s"]
    rows = []
    for name in ("teacher", "student"):
        if name in metrics:
            m = metrics[name]
            rows.append(
                [
                    name,
                    report.pct(m["accuracy"]),
                    report.pct(m["ece"]),
                    report.pct(m.get("agreement")),
                    report.count(m["params"]),
                    report.size(m["size_bytes"]),
                    report.num(m["latency_ms"]),
                    report.count(round(m["throughput"])),
                ]
            )
    summary = [f"Student accuracy **{report.pct(metrics['student']['accuracy'])}** on {metrics['rows']} rows."]
    if "teacher" in metrics:
        summary.append(
            f"Teacher {report.pct(metrics['teacher']['accuracy'])}; the student agrees with it on "
            f"{report.pct(metrics['student']['agreement'])} of the rows."
        )
    return report.Report(
        title="distill report: evaluation",
        description=f"{metrics['student']['path']} on {metrics['rows']} labeled rows",
        summary=summary,
        tables=[report.Table("Evaluation", header, rows)],
    )
