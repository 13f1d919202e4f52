"""Soft-target distillation of a classifier, end to end (Hinton et al. 2015), shared by the array recipes.

Stages, each saved as it finishes so that `resume=True` continues a killed run where it stopped:

1. train the teacher(s) on the labeled data (several = an ensemble, each with its own seed);
2. label the training data plus a transfer set of unlabeled inputs with the teacher's soft targets, once, in a
   cache on disk that every student reads;
3. train the student alone on the labeled data (the baseline);
4. train the same student, from the same initialisation, on the teacher's soft targets over labeled + transfer data
   (hard-label loss only where labels exist); with an ensemble, also a student from the first teacher alone;
5. evaluate everything side by side and write metrics.json, report.md, report.html and the student's weights.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from distill import evaluate as ev
from distill import models
from distill.config import ClassifyRunConfig, LossConfig, ModelSpec, TrainConfig, build
from distill.data import ArrayDataset, concat, read_json
from distill.progress import NULL, Reporter
from distill.teachers import CachedTeacher, EnsembleTeacher, LocalTeacher, Teacher, build_cache
from distill.teachers.local import fingerprint
from distill.train import TrainResult, train


@dataclass
class Problem:
    """Everything a classification recipe provides: data, architectures and their training settings."""

    name: str
    description: str
    train: ArrayDataset
    test: ArrayDataset
    transfer: ArrayDataset | None
    num_classes: int
    teacher: ModelSpec
    student: ModelSpec
    teacher_train: TrainConfig
    student_train: TrainConfig
    alone_batch_size: int
    loss: LossConfig
    teacher_data: ArrayDataset | None = None  # what the teachers train on (default: `train`), e.g. augmented
    pretrained: list[Path] | None = None  # saved teacher directories; None = train teachers from `teacher`


def resolve_specs(
    config: ClassifyRunConfig,
    teacher: ModelSpec,
    student: ModelSpec,
    teacher_train: TrainConfig,
    student_train: TrainConfig,
    loss: LossConfig,
) -> dict[str, Any]:
    """A recipe's defaults with the run config's choices applied (full specs first, then the shortcuts; loss
    settings one by one, so `--alpha` alone keeps the recipe's temperature)."""
    loss = loss.model_copy(update=config.loss.model_dump(exclude_unset=True))
    teacher = config.teacher or teacher
    student = config.student or student
    teacher_train = config.teacher_train or teacher_train
    student_train = config.student_train or student_train
    if config.student_width is not None:  # validated again: the recipe's default depth applies to the new width
        student = build(ModelSpec, {**student.model_dump(), "width": config.student_width}, "student_width")
    if config.epochs is not None:
        student_train = student_train.model_copy(update={"epochs": config.epochs})
    if config.teacher_epochs is not None:
        teacher_train = teacher_train.model_copy(update={"epochs": config.teacher_epochs})
    return {
        "teacher": teacher,
        "student": student,
        "teacher_train": teacher_train,
        "student_train": student_train,
        "loss": loss,
    }


@dataclass
class Trained:
    model: nn.Module
    history: list[dict[str, float]]
    seconds: float
    directory: Path


def _train_or_load(
    name: str,
    spec: ModelSpec,
    problem: Problem,
    data: ArrayDataset,
    config: TrainConfig,
    output: Path,
    *,
    teacher: Teacher | None = None,
    loss: LossConfig | None = None,
    init_seed: int,
    resume: bool,
    reporter: Reporter,
) -> Trained:
    """Train one model (or load it if a resumed run already finished it) and save it under output/models/name."""
    directory = output / "models" / name
    done = directory / "history.json"
    if resume and done.exists():
        model, *_ = models.load(directory)
        saved = read_json(done, ("history", "seconds"))
        return Trained(model, saved["history"], saved["seconds"], directory)
    torch.manual_seed(init_seed)
    model = models.build(spec, problem.train.input_shape, problem.num_classes)
    test = problem.test

    def evaluate(m: nn.Module) -> dict[str, float]:
        return {"test_accuracy": ev.accuracy(ev.predict(m, test.inputs), test.labels)}

    result: TrainResult = train(
        model,
        data,
        config,
        teacher=teacher,
        loss=loss,
        evaluate=evaluate,
        checkpoint_dir=output / "checkpoints" / name,
        resume=resume,
        reporter=reporter,
        name=name,
    )
    models.save(result.model, directory, spec, problem.train.input_shape, problem.num_classes)
    done.write_text(json.dumps({"history": result.history, "seconds": result.seconds}))
    return Trained(result.model, result.history, result.seconds, directory)


def _ensemble_id(members: list[nn.Module], mode: str) -> str:
    digest = hashlib.sha256(mode.encode())
    for member in members:
        digest.update(fingerprint(member).encode())
    return digest.hexdigest()


def _evaluate_student(student: nn.Module, teacher_logits: Tensor, test: ArrayDataset) -> dict[str, Any]:
    logits = ev.predict(student, test.inputs)
    reliability = ev.calibration(logits, test.labels)
    return {
        "accuracy": ev.accuracy(logits, test.labels),
        "agreement": ev.agreement(logits, teacher_logits),
        "kl_to_teacher": ev.kl_to_teacher(logits, teacher_logits),
        "ece": reliability.ece,
        "reliability": reliability.__dict__,
        "params": models.count_parameters(student),
    }


def run_classification(
    problem: Problem,
    *,
    teachers: int,
    ensemble: str,
    seed: int,
    output: Path,
    resume: bool = False,
    reporter: Reporter = NULL,
) -> dict[str, Any]:
    """Run every stage and return the metrics (also written to output/metrics.json)."""
    started = time.perf_counter()
    output.mkdir(parents=True, exist_ok=True)
    loss = problem.loss
    labeled = problem.train
    transfer = problem.transfer.unlabeled() if problem.transfer is not None and len(problem.transfer) else None
    kd_data = concat(labeled, transfer) if transfer is not None else labeled

    # 1. teachers
    members = (
        _load_teachers(problem.pretrained)
        if problem.pretrained
        else [
            _train_or_load(
                f"teacher-{i}",
                problem.teacher,
                problem,
                problem.teacher_data if problem.teacher_data is not None else labeled,
                problem.teacher_train.model_copy(update={"seed": seed + 100 * i}),
                output,
                init_seed=seed + 100 * i,
                resume=resume,
                reporter=reporter,
            )
            for i in range(teachers)
        ]
    )
    member_teachers = [LocalTeacher(m.model, problem.num_classes) for m in members]
    teacher: Teacher = member_teachers[0] if teachers == 1 else EnsembleTeacher(member_teachers, mode=ensemble)  # type: ignore[arg-type]

    # 2. the teacher's soft targets over labeled + transfer data, computed once
    data_id = kd_data.fingerprint()
    cache = build_cache(
        teacher,
        kd_data,
        output / "cache" / "teacher",
        teacher_id=_ensemble_id([m.model for m in members], ensemble),
        data_id=data_id,
        reporter=reporter,
    )
    single_cache: CachedTeacher | None = None
    if teachers > 1:
        single_cache = build_cache(
            member_teachers[0],
            kd_data,
            output / "cache" / "teacher-0",
            teacher_id=fingerprint(members[0].model),
            data_id=data_id,
            reporter=reporter,
        )

    # 3 + 4. the student alone and distilled, from the same initialisation; alone it gets at least as many
    # optimizer steps as the distilled student (more epochs over its smaller data), so the baseline is not starved.
    student_seed = seed + 7
    distilled_steps = problem.student_train.epochs * math.ceil(len(kd_data) / problem.student_train.batch_size)
    alone_epochs = math.ceil(distilled_steps / math.ceil(len(labeled) / problem.alone_batch_size))
    alone_config = problem.student_train.model_copy(
        update={"seed": seed, "batch_size": problem.alone_batch_size, "epochs": max(alone_epochs, 1)}
    )
    alone = _train_or_load(
        "student-alone",
        problem.student,
        problem,
        labeled,
        alone_config,
        output,
        init_seed=student_seed,
        resume=resume,
        reporter=reporter,
    )
    distilled = _train_or_load(
        "student-distilled",
        problem.student,
        problem,
        kd_data,
        problem.student_train.model_copy(update={"seed": seed}),
        output,
        teacher=cache.at_temperature(loss.temperature),
        loss=loss,
        init_seed=student_seed,
        resume=resume,
        reporter=reporter,
    )
    from_single = None
    if single_cache is not None:
        from_single = _train_or_load(
            "student-from-teacher-0",
            problem.student,
            problem,
            kd_data,
            problem.student_train.model_copy(update={"seed": seed}),
            output,
            teacher=single_cache.at_temperature(loss.temperature),
            loss=loss,
            init_seed=student_seed,
            resume=resume,
            reporter=reporter,
        )

    # 5. evaluation, side by side
    reporter.stage("evaluate", total=None)
    test = problem.test
    teacher_logits = ev.teacher_logprobs(teacher, test.inputs)  # (N, C) log-probs are valid logits
    teacher_reliability = ev.calibration(teacher_logits, test.labels)
    teacher_params = sum(models.count_parameters(m.model) for m in members)
    teacher_size = sum((m.directory / models.WEIGHTS).stat().st_size for m in members)
    student_size = (distilled.directory / models.WEIGHTS).stat().st_size

    ensemble_forward = _ensemble_forward([m.model for m in members])
    speed = ev.measure_speed(
        {"teacher": ensemble_forward, "student": distilled.model}, *ev.example_inputs(test.inputs[0])
    )
    teacher_accuracy = ev.accuracy(teacher_logits, test.labels)
    alone_logits = ev.predict(alone.model, test.inputs)
    alone_reliability = ev.calibration(alone_logits, test.labels)
    alone_accuracy = ev.accuracy(alone_logits, test.labels)
    student = _evaluate_student(distilled.model, teacher_logits, test)
    student.update(
        size_bytes=student_size,
        latency_ms=speed["student"].latency_ms,
        throughput=speed["student"].throughput,
        train_seconds=distilled.seconds,
        rows=len(kd_data),
        steps=distilled.history[-1]["step"] if distilled.history else None,
        labeled_rows=len(labeled),
        transfer_rows=len(kd_data) - len(labeled),
    )
    metrics: dict[str, Any] = {
        "recipe": problem.name,
        "description": problem.description,
        "teacher": {
            "kind": "ensemble" if teachers > 1 else "single",
            "members": teachers,
            "ensemble_mode": ensemble if teachers > 1 else None,
            "accuracy": teacher_accuracy,
            "member_accuracy": [ev.accuracy(ev.predict(m.model, test.inputs), test.labels) for m in members],
            "params": teacher_params,
            "size_bytes": teacher_size,
            "latency_ms": speed["teacher"].latency_ms,
            "throughput": speed["teacher"].throughput,
            "ece": teacher_reliability.ece,
            "reliability": teacher_reliability.__dict__,
            "train_seconds": sum(m.seconds for m in members),
            "architecture": problem.teacher.model_dump(),
        },
        "student_alone": {
            "accuracy": alone_accuracy,
            "params": models.count_parameters(alone.model),
            "agreement": ev.agreement(alone_logits, teacher_logits),
            "kl_to_teacher": ev.kl_to_teacher(alone_logits, teacher_logits),
            "ece": alone_reliability.ece,
            "reliability": alone_reliability.__dict__,
            "train_seconds": alone.seconds,
            "rows": len(labeled),
            "steps": alone.history[-1]["step"] if alone.history else None,
        },
        "student_distilled": {**student, "architecture": problem.student.model_dump()},
        "gap_closed": ev.gap_closed(student["accuracy"], alone_accuracy, teacher_accuracy),
        "retention": student["accuracy"] / teacher_accuracy if teacher_accuracy else None,
        "speedup": speed["teacher"].latency_ms / speed["student"].latency_ms,
        "throughput_speedup": speed["student"].throughput / speed["teacher"].throughput,
        "compression": teacher_params / student["params"],
        "size_compression": teacher_size / student_size,
        "loss": loss.model_dump(),
        "test_rows": len(test),
        "history": {
            **{f"teacher-{i}": m.history for i, m in enumerate(members)},
            "student-alone": alone.history,
            "student-distilled": distilled.history,
        },
    }
    if from_single is not None:
        single = _evaluate_student(from_single.model, teacher_logits, test)
        single.pop("reliability")
        metrics["student_from_single_teacher"] = single
        metrics["history"]["student-from-teacher-0"] = from_single.history
    metrics["seconds"] = time.perf_counter() - started
    reporter.end()
    return metrics


def _ensemble_forward(members: list[nn.Module]) -> Callable[[Tensor], Tensor]:
    """The whole teacher as one callable: every member runs, probabilities are averaged (what serving it costs)."""

    def forward(x: Tensor) -> Tensor:
        if len(members) == 1:
            return members[0](x)
        return torch.stack([m(x).softmax(-1) for m in members]).mean(0)

    return forward


def _load_teachers(directories: list[Path]) -> list[Trained]:
    loaded = []
    for directory in directories:
        model, *_ = models.load(directory)
        loaded.append(Trained(model, [], 0.0, Path(directory)))
    return loaded


def finish(metrics: dict[str, Any], output: Path, config_yaml: str) -> None:
    """Write metrics.json, report.md, report.html, plots, config.yaml and student/ (the distilled student)."""
    from distill import report

    report.write(report.classification_report(metrics), output, metrics)
    (output / "config.yaml").write_text(config_yaml)
    student = output / "student"
    student.mkdir(exist_ok=True)
    for name in (models.WEIGHTS, models.SPEC):
        shutil.copyfile(output / "models" / "student-distilled" / name, student / name)
