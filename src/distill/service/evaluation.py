"""The `evaluate` job: a saved model (and optionally its teacher) scored, with a report.

- A built-in MLP/CNN, on a labeled file (`data`). Quality: accuracy and expected calibration error; with a teacher,
  its accuracy, top-1 agreement and KL(teacher || student). Cost: parameters, weights on disk, CPU latency at batch 1
  and rows per second at batch 256, both models timed side by side.
- A causal LM, on tasks of lm-evaluation-harness built from uploaded JSONL files (`tasks`: `choice`, `perplexity` or
  `answer`, as `distill eval-lm` takes them), with the student's retention of the teacher's score per task. Only
  these built-in task kinds: a job never names a task file (the harness's task files can run code).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, model_validator

from distill import eval_lm, evaluate, models, report
from distill.config import Strict
from distill.data import dataset_from_file
from distill.errors import ShapeMismatchError
from distill.progress import Reporter
from distill.service.errors import ServiceError


class EvalTask(Strict):
    """A task of lm-evaluation-harness built from an uploaded JSONL file (see `distill.eval_lm`)."""

    kind: Literal["choice", "perplexity", "answer"]
    data: Path = Field(description="JSONL rows of the kind's fields (file-...)")
    name: str | None = Field(None, pattern=r"^[a-z][a-z0-9_]{0,39}$", description="the task's name in the report")
    prompt: str = Field("{question}\n", max_length=1_000, description="answer tasks: how a question is asked")
    max_gen_toks: Annotated[int, Field(ge=1, le=4096)] = Field(128, description="answer tasks: tokens at most")


class EvaluateJobConfig(Strict):
    """Score a saved model (and optionally its teacher): an MLP/CNN on a labeled CSV/TSV/NPZ file (`data`), or a
    causal LM on tasks (`tasks`)."""

    student: str = Field(
        max_length=1_000, description="the model to score: a finished job's model (job-... or job-.../NAME)"
    )
    teacher: str | None = Field(
        None, max_length=1_000, description="a teacher to compare with (agreement, KL, retention), same refs"
    )
    data: Path | None = Field(
        None, description="an MLP/CNN: labeled rows, CSV/TSV with a label column or NPZ (file-...)"
    )
    tasks: list[EvalTask] = Field(default_factory=list, max_length=16, description="a causal LM: its tasks")
    limit: Annotated[int, Field(ge=1, le=100_000)] | None = Field(None, description="tasks: examples each, at most")
    label_column: str = Field("label", max_length=1_000)
    features_key: str = Field("x", max_length=1_000)
    labels_key: str = Field("y", max_length=1_000)

    @model_validator(mode="after")
    def _one_kind(self) -> EvaluateJobConfig:
        if (self.data is None) == (not self.tasks):
            raise ValueError("give data (an MLP/CNN's labeled rows) or tasks (a causal LM's), not both or neither")
        return self


def check_evaluate(config: Any, _: Any) -> None:
    """When the job is created: a causal LM is scored on tasks, an MLP/CNN on labeled rows (422 otherwise)."""
    folders = [config.student] + ([config.teacher] if config.teacher else [])
    kinds = {(Path(folder) / "config.json").is_file() for folder in folders}
    if len(kinds) > 1:
        raise ServiceError(422, "config.teacher: the student and the teacher must both be causal LMs or both MLP/CNNs",
                           param="config.teacher")  # fmt: skip
    if kinds.pop() != bool(config.tasks):
        what = "a causal LM: give tasks" if config.tasks == [] else "an MLP/CNN: give data (labeled rows)"
        raise ServiceError(422, f"config.student is {what}", param="config.student")


def evaluate_saved(config: EvaluateJobConfig, output: Path, reporter: Reporter) -> dict[str, Any]:
    """Score the model(s) on `config.data` or `config.tasks`; write metrics.json, report.md and report.html."""
    check_evaluate(config, None)
    if config.tasks:
        return _evaluate_lm(config, output, reporter)
    return _evaluate_classifier(config, output, reporter)


def _evaluate_lm(config: EvaluateJobConfig, output: Path, reporter: Reporter) -> dict[str, Any]:
    """The student (and teacher) on the job's tasks with lm-evaluation-harness, and the student's retention."""
    started = time.perf_counter()
    local = [
        eval_lm.LocalTask(t.name or f"{t.kind}_{i}", t.kind, t.data, t.prompt, t.max_gen_toks)
        for i, t in enumerate(config.tasks)
    ]
    include = eval_lm.write_tasks(local, output / "tasks")
    folders = {"teacher": config.teacher, "student": config.student} if config.teacher else {"student": config.student}
    reporter.stage("tasks (lm-evaluation-harness)", total=len(folders))
    scores = {}
    for name, folder in folders.items():
        scores[name] = eval_lm.scores(eval_lm.Model(path=Path(str(folder))), [t.name for t in local], include,
                                      limit=config.limit)  # fmt: skip
        reporter.advance(1)
    reporter.end()
    evaluation = (
        eval_lm.compare(scores) if config.teacher else {"scores": scores, "retention": {}, "teacher": "student"}
    )
    names = [t.name for t in local]
    metrics = {"recipe": "evaluate", "tasks": names, "evaluation": evaluation, "seconds": time.perf_counter() - started}
    rendered = report.Report(title="distill report: evaluate", description=f"tasks: {', '.join(names)}",
                             summary=eval_lm.summary(evaluation), tables=[report.task_table(evaluation)])  # fmt: skip
    report.write(rendered, output, metrics)
    return metrics


def _evaluate_classifier(config: EvaluateJobConfig, output: Path, reporter: Reporter) -> dict[str, Any]:
    """The MLP/CNN (and teacher) on the labeled rows of `config.data`."""
    assert config.data is not None
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
