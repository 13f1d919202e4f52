"""Soft-target distillation of a classifier, end to end (Hinton et al. 2015): the pipeline the classification
recipes (`mnist1d`, `digits`) and `distill train` with a teacher share.

Stages, each saved as it finishes so that a resumed run continues a killed one where it stopped:

1. train the teacher(s) on the labeled data (several = an ensemble, each with its own seed), or load saved ones;
2. label the training data plus a transfer set of unlabeled inputs with the teacher's soft targets, once, in a
   cache on disk that every student reads;
3. train the student alone on the labeled data (the baseline);
4. train the same student, from the same initialisation, on the teacher's soft targets over labeled + transfer data
   (hard-label loss only where labels exist); with an ensemble, also a student from the first teacher alone;
5. evaluate everything side by side; the distilled student is copied to `output/student`.
"""

from __future__ import annotations

import hashlib
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from distill import evaluate, models
from distill.config import BatchSize, LearningRate, LossConfig, ModelSpec, Rows, Seed, Strict, TrainConfig
from distill.data import ArrayDataset, concat
from distill.stages import RunContext, train_or_resume
from distill.teachers import CachedTeacher, EnsembleTeacher, LocalTeacher, Teacher, build_cache
from distill.teachers.ensemble import combine
from distill.teachers.local import fingerprint
from distill.train import train

Ensemble = Literal["mean", "geometric"]


# `distill run` options of a classification recipe, and the config key each one sets
FLAGS = {
    "teachers": "teachers",
    "ensemble": "ensemble",
    "student_width": "student_width",
    "epochs": "epochs",
    "teacher_epochs": "teacher_epochs",
    "transfer_size": "transfer_size",
    "seed": "seed",
    "temperature": "loss.temperature",
    "alpha": "loss.alpha",
    "divergence": "loss.divergence",
}


class ClassifyConfig(Strict):
    """The settings of a classification recipe; each recipe's own model (`Mnist1dConfig`, `DigitsConfig`) gives
    the defaults. `epochs`, `teacher_epochs` and `student_width` are shortcuts for `student_train.epochs`,
    `teacher_train.epochs` and `student.width`."""

    SHORTCUTS = {
        "epochs": "student_train.epochs",
        "teacher_epochs": "teacher_train.epochs",
        "student_width": "student.width",
    }

    teachers: Annotated[int, Field(ge=1, le=32)] = Field(1, description="teachers in the ensemble")
    ensemble: Ensemble = Field("mean", description="how an ensemble combines: mean (of probabilities) or geometric")
    teacher: ModelSpec = Field(default_factory=ModelSpec, description="the teacher's architecture")
    student: ModelSpec = Field(default_factory=ModelSpec, description="the student's architecture")
    transfer_size: Rows = Field(0, description="freshly generated inputs labeled by the teacher")
    train_size: Annotated[Rows, Field(ge=10)] | None = Field(
        None, description="labeled training examples; all if unset"
    )
    loss: LossConfig = Field(default_factory=LossConfig)
    teacher_train: TrainConfig = Field(default_factory=TrainConfig)
    student_train: TrainConfig = Field(default_factory=TrainConfig)
    alone_batch_size: BatchSize = Field(32, description="batches of the student alone, over its smaller data")
    alone_lr: LearningRate | None = Field(
        None, description="learning rate of the student alone, in its smaller batches; null: student_train.lr"
    )
    seed: Seed = 0


@dataclass
class Task:
    """What the pipeline trains on and with: the data and the settings of every model."""

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
    loss: LossConfig
    alone_batch_size: int
    alone_lr: float | None = None  # None: student_train.lr
    teachers: int = 1
    ensemble: Ensemble = "mean"
    seed: int = 0
    teacher_data: ArrayDataset | None = None  # what the teachers train on (default: `train`), e.g. augmented
    pretrained: list[Path] | None = None  # saved teacher directories; None = train teachers from `teacher`


def task_settings(config: ClassifyConfig) -> dict[str, Any]:
    """The Task fields a classification config sets."""
    names = ("teacher", "student", "teacher_train", "student_train", "loss", "alone_batch_size", "alone_lr", "teachers")
    return {name: getattr(config, name) for name in names} | {"ensemble": config.ensemble, "seed": config.seed}


@dataclass
class Trained:
    model: nn.Module
    history: list[dict[str, float]]
    seconds: float
    directory: Path


def _fit(
    name: str,
    spec: ModelSpec,
    task: Task,
    data: ArrayDataset,
    config: TrainConfig,
    run: RunContext,
    *,
    teacher: Teacher | None = None,
    init_seed: int,
) -> Trained:
    """Train one model (or load it if a resumed run already finished it) and save it under output/models/name."""
    directory = run.output / "models" / name

    def fit() -> tuple[nn.Module, dict[str, Any]]:
        torch.manual_seed(init_seed)
        test = task.test
        result = train(
            models.build(spec, task.train.input_shape, task.num_classes),
            data,
            config,
            teacher=teacher,
            loss=task.loss if teacher is not None else None,
            evaluate=lambda m: {"test_accuracy": evaluate.accuracy(evaluate.predict(m, test.inputs), test.labels)},
            checkpoint_dir=run.output / "checkpoints" / name,
            resume=run.resume,
            reporter=run.reporter,
            name=name,
        )
        return result.model, {"history": result.history, "seconds": result.seconds}

    def save(model: nn.Module, folder: Path) -> None:
        models.save(model, folder, spec, task.train.input_shape, task.num_classes)

    model, record = train_or_resume(
        directory, resume=run.resume, train=fit, save=save, load=lambda folder: models.load(folder)[0]
    )
    return Trained(model, record["history"], record["seconds"], directory)


def _teachers(task: Task, run: RunContext) -> list[Trained]:
    """Stage 1: the saved teachers, or each teacher trained with its own seed."""
    if task.pretrained:
        return [Trained(models.load(d)[0], [], 0.0, Path(d)) for d in task.pretrained]
    data = task.teacher_data if task.teacher_data is not None else task.train
    return [
        _fit(
            f"teacher-{i}",
            task.teacher,
            task,
            data,
            task.teacher_train.model_copy(update={"seed": task.seed + 100 * i}),
            run,
            init_seed=task.seed + 100 * i,
        )
        for i in range(task.teachers)
    ]


def _ensemble_id(members: list[nn.Module], mode: str) -> str:
    digest = hashlib.sha256(mode.encode())
    for member in members:
        digest.update(fingerprint(member).encode())
    return digest.hexdigest()


@dataclass
class SoftTargets:
    teacher: Teacher  # the whole teacher, live (an ensemble of the members)
    cache: CachedTeacher  # its soft targets over the training data
    single: CachedTeacher | None  # with an ensemble, the first member's alone


def _soft_targets(task: Task, members: list[Trained], data: ArrayDataset, run: RunContext) -> SoftTargets:
    """Stage 2: the teacher's outputs over labeled + transfer data, computed once into a cache."""
    live = [LocalTeacher(m.model, task.num_classes) for m in members]
    teacher: Teacher = live[0] if len(live) == 1 else EnsembleTeacher(live, mode=task.ensemble)  # type: ignore[arg-type]
    folder = run.output / "cache"
    ensemble_id = _ensemble_id([m.model for m in members], task.ensemble)
    cache = build_cache(teacher, data, folder / "teacher", teacher_id=ensemble_id, data_id=data.fingerprint(),
                        reporter=run.reporter)  # fmt: skip
    single = None
    if len(members) > 1:
        single = build_cache(live[0], data, folder / "teacher-0", teacher_id=fingerprint(members[0].model),
                             data_id=data.fingerprint(), reporter=run.reporter)  # fmt: skip
    return SoftTargets(teacher, cache, single)


def _alone_train(task: Task, data: ArrayDataset) -> TrainConfig:
    """The student alone's training: at least as many optimizer steps as the distilled student's over `data` (more
    epochs over its smaller data), so the baseline is not starved, in its own batches at its own learning rate."""
    steps = task.student_train.epochs * math.ceil(len(data) / task.student_train.batch_size)
    epochs = math.ceil(steps / math.ceil(len(task.train) / task.alone_batch_size))
    lr = task.alone_lr if task.alone_lr is not None else task.student_train.lr
    return task.student_train.model_copy(
        update={"seed": task.seed, "batch_size": task.alone_batch_size, "epochs": max(epochs, 1), "lr": lr}
    )


def _students(task: Task, data: ArrayDataset, soft: SoftTargets, run: RunContext) -> dict[str, Trained]:
    """Stages 3 and 4: the student alone (`_alone_train`) and distilled, from the same initialisation."""
    seed, init = task.seed, task.seed + 7
    alone = _alone_train(task, data)
    distilled = task.student_train.model_copy(update={"seed": seed})
    temperature = task.loss.temperature
    students = {
        "student-alone": _fit("student-alone", task.student, task, task.train, alone, run, init_seed=init),
        "student-distilled": _fit("student-distilled", task.student, task, data, distilled, run,
                                  teacher=soft.cache.at_temperature(temperature), init_seed=init),
    }  # fmt: skip
    if soft.single is not None:
        students["student-from-teacher-0"] = _fit("student-from-teacher-0", task.student, task, data, distilled,
                                                  run, teacher=soft.single.at_temperature(temperature), init_seed=init)  # fmt: skip
    return students


def _student_scores(student: nn.Module, teacher_logits: Tensor, test: ArrayDataset) -> dict[str, Any]:
    logits = evaluate.predict(student, test.inputs)
    reliability = evaluate.calibration(logits, test.labels)
    return {
        "accuracy": evaluate.accuracy(logits, test.labels),
        "agreement": evaluate.agreement(logits, teacher_logits),
        "kl_to_teacher": evaluate.kl_to_teacher(logits, teacher_logits),
        "ece": reliability.ece,
        "reliability": reliability.__dict__,
        "params": models.count_parameters(student),
    }


def _teacher_scores(task: Task, members: list[Trained], logits: Tensor, speed: Any) -> dict[str, Any]:
    test = task.test
    reliability = evaluate.calibration(logits, test.labels)
    return {
        "kind": "ensemble" if len(members) > 1 else "single",
        "members": len(members),
        "ensemble_mode": task.ensemble if len(members) > 1 else None,
        "accuracy": evaluate.accuracy(logits, test.labels),
        "member_accuracy": [evaluate.accuracy(evaluate.predict(m.model, test.inputs), test.labels) for m in members],
        "params": sum(models.count_parameters(m.model) for m in members),
        "size_bytes": sum((m.directory / models.WEIGHTS).stat().st_size for m in members),
        "latency_ms": speed.latency_ms,
        "throughput": speed.throughput,
        "ece": reliability.ece,
        "reliability": reliability.__dict__,
        "train_seconds": sum(m.seconds for m in members),
        "architecture": task.teacher.model_dump(),
    }


def _alone_scores(alone: Trained, teacher_logits: Tensor, task: Task, data: ArrayDataset) -> dict[str, Any]:
    scores = _student_scores(alone.model, teacher_logits, task.test)
    config = _alone_train(task, data)
    scores.update(train_seconds=alone.seconds, rows=len(task.train), batch_size=config.batch_size, lr=config.lr)
    scores["steps"] = alone.history[-1]["step"] if alone.history else None
    return scores


def _distilled_scores(
    distilled: Trained, teacher_logits: Tensor, task: Task, data: ArrayDataset, speed: Any
) -> dict[str, Any]:
    scores = _student_scores(distilled.model, teacher_logits, task.test)
    scores.update(
        size_bytes=(distilled.directory / models.WEIGHTS).stat().st_size,
        latency_ms=speed.latency_ms,
        throughput=speed.throughput,
        train_seconds=distilled.seconds,
        rows=len(data),
        steps=distilled.history[-1]["step"] if distilled.history else None,
        batch_size=task.student_train.batch_size,
        lr=task.student_train.lr,
        labeled_rows=len(task.train),
        transfer_rows=len(data) - len(task.train),
        architecture=task.student.model_dump(),
    )
    return scores


def _comparison(teacher: dict[str, Any], alone: dict[str, Any], student: dict[str, Any]) -> dict[str, Any]:
    """What distillation kept and saved: gap closed, retention, speed-ups and compression."""
    return {
        "gap_closed": evaluate.gap_closed(student["accuracy"], alone["accuracy"], teacher["accuracy"]),
        "retention": student["accuracy"] / teacher["accuracy"] if teacher["accuracy"] else None,
        "speedup": teacher["latency_ms"] / student["latency_ms"],
        "throughput_speedup": student["throughput"] / teacher["throughput"],
        "compression": teacher["params"] / student["params"],
        "size_compression": teacher["size_bytes"] / student["size_bytes"],
    }


def _ensemble_forward(members: list[nn.Module], mode: Ensemble) -> Any:
    """The whole teacher as one callable, every member running and their outputs combined (what serving it costs)."""
    if len(members) == 1:
        return members[0]
    return lambda x: combine(torch.stack([m(x).log_softmax(-1) for m in members]), mode)  # (B, C)


def _evaluation(
    task: Task, members: list[Trained], soft: SoftTargets, students: dict[str, Trained], data: ArrayDataset
) -> dict[str, Any]:
    """Stage 5: every model on the test set and on this CPU, side by side."""
    test, distilled = task.test, students["student-distilled"]
    forward = _ensemble_forward([m.model for m in members], task.ensemble)
    example = evaluate.example_inputs(test.inputs[0])
    speed = evaluate.measure_speed({"teacher": forward, "student": distilled.model}, *example)
    teacher_logits = evaluate.teacher_logprobs(soft.teacher, test.inputs)  # (N, C) log-probs are valid logits
    teacher = _teacher_scores(task, members, teacher_logits, speed["teacher"])
    alone = _alone_scores(students["student-alone"], teacher_logits, task, data)
    student = _distilled_scores(distilled, teacher_logits, task, data, speed["student"])
    metrics = {"teacher": teacher, "student_alone": alone, "student_distilled": student}
    if "student-from-teacher-0" in students:
        single = _student_scores(students["student-from-teacher-0"].model, teacher_logits, test)
        single.pop("reliability")
        metrics["student_from_single_teacher"] = single
    return metrics | _comparison(teacher, alone, student)


def run_classification(task: Task, run: RunContext) -> dict[str, Any]:
    """Run every stage; return the metrics. The distilled student is also copied to `output/student`."""
    run.output.mkdir(parents=True, exist_ok=True)
    transfer = task.transfer.unlabeled() if task.transfer is not None and len(task.transfer) else None
    data = concat(task.train, transfer) if transfer is not None else task.train
    members = _teachers(task, run)
    soft = _soft_targets(task, members, data, run)
    students = _students(task, data, soft, run)
    run.reporter.stage("evaluate", total=None)
    metrics: dict[str, Any] = {"recipe": task.name, "description": task.description}
    metrics |= _evaluation(task, members, soft, students, data)
    metrics |= {"loss": task.loss.model_dump(), "test_rows": len(task.test)}
    metrics["history"] = {
        **{f"teacher-{i}": m.history for i, m in enumerate(members)},
        **{name: s.history for name, s in students.items()},
    }
    run.reporter.end()
    _copy_student(run.output)
    return metrics


def _copy_student(output: Path) -> None:
    """The distilled student's weights and spec also in `output/student`, where users (and the service) find it."""
    student = output / "student"
    student.mkdir(exist_ok=True)
    for name in (models.WEIGHTS, models.SPEC):
        shutil.copyfile(output / "models" / "student-distilled" / name, student / name)
