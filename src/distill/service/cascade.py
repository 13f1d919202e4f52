"""Cascade deployments: the student answers when it is confident enough, otherwise the teacher does.

The threshold is chosen on validation inputs (labels are not needed: the cascade is judged by its agreement with the
teacher). With the student's confidence c_i = max_k p_student(k | x_i) and a_i = 1 when the student's top class is
the teacher's, a threshold t gives

    escalation(t) = mean_i [c_i < t]                  (the share of inputs the teacher answers)
    agreement(t)  = mean_i (a_i if c_i >= t else 1)   (the cascade's answer equals the teacher's)

agreement(t) only grows with t, so `choose_threshold` takes the lowest t (the fewest escalations) whose agreement
reaches the target, as judged by a lower confidence bound at level `assurance` (`distill.cascade_curve`). The deployment keeps these validation figures and counts live traffic: requests, escalations,
and, for escalated inputs (where both models ran), how often the student would have agreed.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from sqlalchemy import Engine, select
from sqlalchemy.exc import IntegrityError
from torch import Tensor, nn

from distill import cascade_curve, models
from distill.service import db
from distill.service.errors import ServiceError, not_found
from distill.service.refs import Resolver, job_output, model_folder
from distill.service.settings import Settings
from distill.teachers.ensemble import MODES, Mode, combine

VALIDATION_SEED = 977  # generated validation signals use other generator seeds than any recipe's transfer set


@dataclass(frozen=True)
class Choice:
    threshold: float
    escalation_rate: float
    agreement: float
    student_agreement: float  # the student alone, for comparison
    rows: int
    assurance: float  # the level of the lower bound that reached the target
    margin: float  # agreement - margin >= the target


def choose_threshold(
    confidence: Tensor, agree: Tensor, target: float, assurance: float = cascade_curve.ASSURANCE
) -> Choice:
    """The lowest confidence threshold whose cascade agreement with the teacher is at least `target` at confidence
    `assurance` (`distill.cascade_curve.choose` with the teacher's answers as the reference).

    confidence: (N,) the student's top probability; agree: (N,) bool, student top-1 == teacher top-1."""
    if confidence.numel() == 0:
        raise ServiceError(422, "validation: no inputs to choose a threshold on", param="validation")
    chosen = cascade_curve.choose(confidence, agree, torch.ones_like(agree, dtype=torch.bool), target, assurance)
    return Choice(
        threshold=chosen.threshold,
        escalation_rate=chosen.escalation_rate,
        agreement=chosen.score,
        student_agreement=chosen.student_score,
        rows=chosen.rows,
        assurance=chosen.assurance,
        margin=chosen.margin,
    )


class Classifier:
    """One saved MLP/CNN, or several combined as the ensemble teacher of the job they taught
    (`distill.teachers.ensemble.combine` with that job's mode)."""

    def __init__(
        self, members: list[nn.Module], input_shape: tuple[int, ...], num_classes: int, mode: Mode = "mean"
    ) -> None:
        self.members, self.input_shape, self.num_classes, self.mode = members, input_shape, num_classes, mode

    @classmethod
    def load(cls, folders: list[Path], mode: Mode = "mean") -> Classifier:
        loaded = [models.load(folder) for folder in folders]
        shapes = {(shape, classes) for _, _, shape, classes in loaded}
        if len(shapes) != 1:
            raise ServiceError(422, "the teachers differ in input shape or classes", param="student")
        ((shape, classes),) = shapes
        return cls([model for model, *_ in loaded], shape, classes, mode)

    @torch.inference_mode()
    def logprobs(self, inputs: Tensor) -> Tensor:
        """(N, *input_shape) -> (N, C) log-probabilities."""
        members = torch.stack([m(inputs.float()).float().log_softmax(-1) for m in self.members])  # (M, N, C)
        return combine(members, self.mode)  # (N, C)


def ensemble_mode(job: dict[str, Any]) -> Mode:
    """How the job's teachers were combined into the one that taught its student (its config's `ensemble`)."""
    mode = job["config"].get("ensemble", "mean")
    if mode not in MODES:
        raise ServiceError(422, f"student: job {job['id']} names an unknown ensemble mode {mode!r}", param="student")
    return mode


def teacher_of(settings: Settings, engine: Engine, job: dict[str, Any]) -> Classifier:
    """The teacher a finished job distilled from, its members combined as the job combined them."""
    return Classifier.load(teacher_folders(settings, engine, job), ensemble_mode(job))


def teacher_folders(settings: Settings, engine: Engine, job: dict[str, Any]) -> list[Path]:
    """The teacher(s) a finished job distilled from: trained by a recipe (`models/teacher-*`), or the saved models
    a `train` job named."""
    output = job_output(settings, job["id"])
    trained = sorted(p for p in (output / "models").glob("teacher-*") if (p / models.SPEC).is_file())
    if trained:
        return trained
    named = job["config"].get("teacher") if job["kind"] == "train" else None
    if named:
        resolver = Resolver(settings, engine)
        refs = named if isinstance(named, list) else [named]
        return [Path(resolver.model(ref, f"teacher.{i}", "array")) for i, ref in enumerate(refs)]
    raise ServiceError(422, f"student: job {job['id']} has no teacher to escalate to", param="student")


def validation_inputs(
    settings: Settings, engine: Engine, job: dict[str, Any], file_id: str | None, size: int, shape: tuple[int, ...]
) -> tuple[Tensor, str]:
    """Inputs to choose the threshold on: an uploaded file's rows, or fresh MNIST-1D signals for mnist1d jobs."""
    if file_id is not None:
        from distill.data import dataset_from_file

        path = Resolver(settings, engine).file(file_id, "validation")
        data = dataset_from_file(Path(path), input_shape=shape, require_labels=False)
        return data.inputs, file_id
    if job["kind"] == "recipe" and job["config"].get("recipe", "mnist1d") == "mnist1d":
        from distill.recipes.mnist1d import transfer_inputs

        signals = transfer_inputs(size, VALIDATION_SEED, settings.store_dir)
        return torch.from_numpy(signals), f"{size} generated MNIST-1D signals"
    raise ServiceError(422, "validation: give an uploaded file of inputs (file-...) for this job", param="validation")


def create(
    settings: Settings,
    engine: Engine,
    job: dict[str, Any],
    *,
    name: str,
    target: float,
    assurance: float,
    validation: str | None,
    size: int,
    created_by: str,
) -> dict[str, Any]:
    """Choose the threshold on validation data and store the deployment."""
    check_deployable(job, name)
    folder = model_folder(job_output(settings, job["id"]))
    if folder is None or not (folder / models.SPEC).is_file():
        raise ServiceError(
            422, f"student: job {job['id']} has no MLP/CNN student to serve in a cascade", param="student"
        )
    student = Classifier.load([folder])
    teacher = teacher_of(settings, engine, job)
    if (teacher.input_shape, teacher.num_classes) != (student.input_shape, student.num_classes):
        raise ServiceError(422, "student: the student and its teacher differ in inputs or classes", param="student")
    inputs, source = validation_inputs(settings, engine, job, validation, size, student.input_shape)
    student_logp, teacher_logp = student.logprobs(inputs), teacher.logprobs(inputs)  # (N, C), (N, C)
    confidence, predicted = student_logp.exp().max(-1)  # (N,), (N,)
    choice = choose_threshold(confidence, predicted == teacher_logp.argmax(-1), target, assurance)
    record = {
        "id": name,
        "student": job["id"],
        "threshold": choice.threshold,
        "target_agreement": target,
        "validation": json.dumps({**asdict(choice), "source": source}),
        "requests": 0,
        "escalated": 0,
        "escalated_agree": 0,
        "created_by": created_by,
        "created_at": time.time(),
    }
    try:
        with db.write(engine) as connection:
            connection.execute(db.deployments.insert().values(**record))
    except IntegrityError:
        raise ServiceError(409, f"a deployment named {name!r} exists; delete it first or pick another name") from None
    return public(record)


def check_deployable(job: dict[str, Any], name: str) -> None:
    """A deployment's name is not a job's model id, and its job has succeeded."""
    if name.startswith("job-"):
        raise ServiceError(422, "name: must not start with job- (those are the jobs' own model ids)", param="name")
    if job["status"] != "succeeded":
        raise ServiceError(409, f"job {job['id']} is {job['status']}; deploy a job that has succeeded")


def public(row: Any) -> dict[str, Any]:
    """A deployment as the API shows it; an LM cascade's (`cascade_lm`) also names its models and measure."""
    data = dict(row._mapping) if hasattr(row, "_mapping") else dict(row)
    requests, escalated = data["requests"], data["escalated"]
    validation = json.loads(data["validation"])
    lm = validation.pop("type", None) == "lm"
    named = validation.pop("student_model", None) if lm else None
    models = {"teacher": validation.pop("teacher"), "confidence": validation.pop("confidence")} if lm else {}
    return {
        "id": data["id"],
        "object": "deployment",
        "kind": "cascade",
        "model_type": "lm" if lm else "classifier",
        "student": data["student"] + (f"/{named}" if named else ""),
        **models,
        "threshold": data["threshold"],
        "target_agreement": data["target_agreement"],
        "validation": validation,
        "live": {
            "requests": requests,
            "escalated": escalated,
            "escalation_rate": escalated / requests if requests else None,
            "escalated_agreement": data["escalated_agree"] / escalated if escalated else None,
        },
        "created_at": data["created_at"],
    }


def get(engine: Engine, name: str) -> dict[str, Any]:
    with db.read(engine) as connection:
        row = connection.execute(select(db.deployments).where(db.deployments.c.id == name)).first()
    if row is None:
        raise not_found("deployment", name)
    return public(row)


def listing(engine: Engine) -> list[dict[str, Any]]:
    with db.read(engine) as connection:
        rows = connection.execute(select(db.deployments).order_by(db.deployments.c.created_at)).all()
    return [public(row) for row in rows]


def delete(engine: Engine, name: str) -> None:
    with db.write(engine) as connection:
        if connection.execute(db.deployments.delete().where(db.deployments.c.id == name)).rowcount == 0:
            raise not_found("deployment", name)


def count(engine: Engine, name: str, requests: int, escalated: int, agreed: int) -> None:
    """Add one request's rows to the deployment's live counters."""
    with db.write(engine) as connection:
        connection.execute(
            db.deployments.update()
            .where(db.deployments.c.id == name)
            .values(
                requests=db.deployments.c.requests + requests,
                escalated=db.deployments.c.escalated + escalated,
                escalated_agree=db.deployments.c.escalated_agree + agreed,
            )
        )
