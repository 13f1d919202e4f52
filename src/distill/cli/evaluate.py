"""`distill eval-lm`: a student and its teacher scored on tasks with lm-evaluation-harness, with the retention."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from distill import eval_lm
from distill.cli.app import app, out, output_dir
from distill.errors import DistillError
from distill.eval_lm import Kind, LocalTask, Model


def _local_tasks(kind: Kind, files: list[Path]) -> list[LocalTask]:
    return [LocalTask(f"{kind}_{path.stem}".replace("-", "_"), kind, path) for path in files]


@app.command("eval-lm")
def eval_lm_command(
    student: Optional[Path] = typer.Option(None, help="The student: a causal LM folder (with its tokenizer)."),
    teacher: Optional[Path] = typer.Option(None, help="Its teacher, scored the same way: the retention is against it."),
    task: list[str] = typer.Option([], help="A task by the harness's name (repeatable): its own, or one in --include."),
    include: Optional[Path] = typer.Option(None, help="A folder of the harness's YAML task files (your own tasks)."),
    choice: list[Path] = typer.Option([], help="JSONL of query, choices, gold: a multiple-choice task (repeatable)."),
    perplexity: list[Path] = typer.Option([], help="JSONL of text: a perplexity task (repeatable)."),
    answer: list[Path] = typer.Option([], help="JSONL of question, answer ('#### x'): an exact-answer task."),
    base_url: Optional[str] = typer.Option(None, help="Score models behind this OpenAI-compatible endpoint instead."),
    student_model: Optional[str] = typer.Option(None, help="With --base-url: the student's model id there."),
    teacher_model: Optional[str] = typer.Option(None, help="With --base-url: the teacher's model id there."),
    tokenizer: Optional[Path] = typer.Option(None, help="With --base-url: a local folder of the models' tokenizer."),
    limit: Optional[int] = typer.Option(None, min=1, help="Only the first N examples of each task."),
    batch_size: int = typer.Option(16, min=1, max=1024, help="Examples scored together."),
    num_fewshot: Optional[int] = typer.Option(None, min=0, max=64, help="Examples shown before each question."),
    device: str = typer.Option("cpu", help="cpu, cuda or cuda:N (local folders)."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Output directory (default runs/eval-<time>)."),
) -> None:
    """Score a student (and its teacher) on tasks with lm-evaluation-harness; write metrics.json and a report with
    the student's retention per task. Local models or models behind an OpenAI-compatible API; local task files."""
    from distill import report

    models = _models(student, teacher, base_url, student_model, teacher_model, tokenizer)
    directory = output_dir(output, "eval", False)
    local = _local_tasks("choice", choice) + _local_tasks("perplexity", perplexity) + _local_tasks("answer", answer)
    if local and include is not None:
        raise DistillError("give --include (your task files) or local --choice/--perplexity/--answer files, not both")
    if local:
        include = eval_lm.write_tasks(local, directory / "tasks")
    names = [*task, *(t.name for t in local)]
    if not names:
        raise DistillError("name at least one task: --task NAME, or --choice/--perplexity/--answer FILE")
    scores = {name: eval_lm.scores(model, names, include, limit=limit, batch_size=batch_size, device=device,
                                   num_fewshot=num_fewshot) for name, model in models.items()}  # fmt: skip
    evaluation = (
        eval_lm.compare(scores) if "teacher" in scores else {"scores": scores, "retention": {}, "teacher": "student"}
    )
    metrics = {"recipe": "eval-lm", "tasks": names, "evaluation": evaluation}
    rendered = report.Report(title="distill report: eval-lm", description=f"tasks: {', '.join(names)}",
                             summary=eval_lm.summary(evaluation), tables=[report.task_table(evaluation)])  # fmt: skip
    report.write(rendered, directory, metrics)
    out.print_json(json.dumps(evaluation, default=str))
    out.print(f"Wrote {directory}/report.md, report.html and metrics.json")


def _models(
    student: Path | None,
    teacher: Path | None,
    base_url: str | None,
    student_model: str | None,
    teacher_model: str | None,
    tokenizer: Path | None,
) -> dict[str, Model]:
    if base_url is not None:
        if student_model is None:
            raise DistillError("--base-url needs --student-model (and --teacher-model for the retention)")
        models = {"student": Model(base_url=base_url, name=student_model, tokenizer=tokenizer)}
        if teacher_model is not None:
            models = {"teacher": Model(base_url=base_url, name=teacher_model, tokenizer=tokenizer), **models}
        return models
    if student is None:
        raise DistillError("give --student FOLDER (or --base-url with --student-model)")
    found = {"student": Model(path=student)}
    return {"teacher": Model(path=teacher), **found} if teacher is not None else found
