"""Reports: metrics rendered as `report.md` (with PNG plots beside it) and a self-contained `report.html`.

A `Report` is plain data (a title, summary lines, tables, notes, plots); each recipe family turns its metrics into
one (`classification_report` here), and `write` renders any report both ways.
"""

from __future__ import annotations

import base64
import html
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from distill import plots


@dataclass
class Table:
    title: str
    header: list[str]
    rows: list[list[str]]


@dataclass
class Report:
    title: str
    description: str
    summary: list[str] = field(default_factory=list)
    tables: list[Table] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    images: dict[str, bytes] = field(default_factory=dict)  # file name -> PNG bytes


# ----------------------------------------------------------------------------------------------------------------
# Formatting
# ----------------------------------------------------------------------------------------------------------------


def pct(value: float | None, digits: int = 1) -> str:
    return "–" if value is None else f"{100 * value:.{digits}f} %"


def num(value: float | None, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def count(value: int | None) -> str:
    return "–" if value is None else f"{value:,}"


def size(n_bytes: int | None) -> str:
    if n_bytes is None:
        return "–"
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n_bytes >= scale:
            return f"{n_bytes / scale:.1f} {unit}"
    return f"{n_bytes} B"


def ratio(value: float | None) -> str:
    return "–" if value is None else f"{value:.1f}x"


def seconds(value: float | None) -> str:
    return "–" if value is None else f"{value:.1f} s"


# ----------------------------------------------------------------------------------------------------------------
# Classification (soft-target recipes and `distill train`)
# ----------------------------------------------------------------------------------------------------------------


def learning_curves(histories: dict[str, list[dict[str, float]]], metric: str) -> dict[str, bytes]:
    """The report's learning-curve plot of the runs that have a history (none when no run has one)."""
    usable = {name: history for name, history in histories.items() if history}
    return {"learning_curves.png": plots.learning_curves(usable, metric)} if usable else {}


def task_table(evaluation: dict[str, Any]) -> Table:
    """Task scores from lm-evaluation-harness (`distill.eval_lm.compare`): per task and metric, every model's score
    and, for each student, the share of the teacher's it keeps."""
    scores, teacher = evaluation["scores"], evaluation["teacher"]
    students = [name for name in scores if name != teacher]
    header = ["task", "metric", teacher, *(f"{name} ({kept})" for name in students for kept in ("score", "retention"))]
    rows = []
    for task, metrics in scores[teacher].items():
        for metric, value in metrics.items():
            if metric.startswith("_"):
                continue
            row = [task, metric, num(value, 4)]
            for name in students:
                kept = evaluation["retention"][name].get(task, {}).get(metric)
                row += [num(scores[name].get(task, {}).get(metric), 4), pct(kept)]
            rows.append(row)
    return Table("Task scores (lm-evaluation-harness) and retention", header, rows)


def classification_table(metrics: dict[str, Any]) -> Table:
    """Teacher vs student alone vs student distilled (and, with an ensemble, the student from one teacher)."""
    teacher, alone, student = metrics["teacher"], metrics["student_alone"], metrics["student_distilled"]
    teacher_name = f"teacher ({teacher['members']}-model ensemble)" if teacher["members"] > 1 else "teacher"
    rows = [
        [
            teacher_name,
            pct(teacher["accuracy"]),
            count(teacher["params"]),
            size(teacher.get("size_bytes")),
            num(teacher.get("latency_ms")),
            count(round(teacher["throughput"])) if teacher.get("throughput") else "–",
            "–",
            "–",
            pct(teacher.get("ece")),
            seconds(teacher.get("train_seconds")),
        ],
        [
            "student alone",
            pct(alone["accuracy"]),
            count(alone["params"]),
            size(student.get("size_bytes")),
            num(student.get("latency_ms")),
            count(round(student["throughput"])) if student.get("throughput") else "–",
            pct(alone.get("agreement")),
            num(alone.get("kl_to_teacher")),
            pct(alone.get("ece")),
            seconds(alone.get("train_seconds")),
        ],
        [
            "student distilled",
            pct(student["accuracy"]),
            count(student["params"]),
            size(student.get("size_bytes")),
            num(student.get("latency_ms")),
            count(round(student["throughput"])) if student.get("throughput") else "–",
            pct(student.get("agreement")),
            num(student.get("kl_to_teacher")),
            pct(student.get("ece")),
            seconds(student.get("train_seconds")),
        ],
    ]
    single = metrics.get("student_from_single_teacher")
    if single:
        rows.append(
            [
                "student distilled from teacher 0 only",
                pct(single["accuracy"]),
                count(single["params"]),
                size(student.get("size_bytes")),
                num(student.get("latency_ms")),
                "–",
                pct(single["agreement"]),
                num(single["kl_to_teacher"]),
                pct(single["ece"]),
                "–",
            ]
        )
    header = [
        "model",
        "test accuracy",
        "parameters",
        "size",
        "latency ms (batch 1)",
        "rows/s (batch 256)",
        "agreement",
        "KL to teacher",
        "ECE",
        "train time",
    ]
    return Table("Teacher vs student", header, rows)


def classification_summary(metrics: dict[str, Any]) -> list[str]:
    teacher, alone, student = metrics["teacher"], metrics["student_alone"], metrics["student_distilled"]
    lines = [
        f"The distilled student keeps **{pct(metrics['retention'])}** of the teacher's accuracy "
        f"({pct(student['accuracy'])} vs {pct(teacher['accuracy'])}) with **{ratio(metrics['compression'])} fewer "
        f"parameters**, **{ratio(metrics['speedup'])} lower latency** and **{ratio(metrics['throughput_speedup'])} "
        "higher throughput** on this CPU.",
        f"Trained alone on the same {count(alone['rows'])} labeled rows, the same student reaches "
        f"{pct(alone['accuracy'])}: distillation closes **{num(metrics['gap_closed'], 2)}** of the gap to the teacher "
        f"(gap closed = (distilled - alone) / (teacher - alone)).",
    ]
    if teacher["members"] > 1:
        best = max(teacher["member_accuracy"])
        single = metrics.get("student_from_single_teacher", {})
        verdict = "is at least as accurate as" if teacher["accuracy"] >= best else "is less accurate than"
        lines.append(
            f"The {teacher['members']}-model ensemble ({pct(teacher['accuracy'])}) {verdict} its best member "
            f"({pct(best)}); members: {', '.join(pct(a) for a in teacher['member_accuracy'])}."
        )
        if single:
            diff = student["accuracy"] - single["accuracy"]
            lines.append(
                f"The student distilled from the ensemble reaches {pct(student['accuracy'])}, against "
                f"{pct(single['accuracy'])} for the same student distilled from teacher 0 alone "
                f"({'+' if diff >= 0 else ''}{100 * diff:.1f} points)."
            )
    return lines


def _batches_and_rate(scores: dict[str, Any]) -> str:
    """' (batches of 32, learning rate 0.005)' where the run recorded them (older runs' metrics did not)."""
    if scores.get("batch_size") is None or scores.get("lr") is None:
        return ""
    return f" (batches of {count(scores['batch_size'])}, learning rate {scores['lr']:g})"


def classification_report(metrics: dict[str, Any]) -> Report:
    teacher, alone, student = metrics["teacher"], metrics["student_alone"], metrics["student_distilled"]
    loss = metrics["loss"]
    notes = [
        f"Loss: alpha * T^2 * {loss['divergence']}(teacher_T || student_T) + (1 - alpha) * CE(labels), "
        f"T = {loss['temperature']}, alpha = {loss['alpha']}; the hard-label term applies only to labeled rows.",
        f"The distilled student trained on {count(student.get('rows'))} rows: {count(student.get('labeled_rows'))} "
        f"labeled and {count(student.get('transfer_rows'))} transfer rows labeled only by the teacher.",
        f"The student alone trained for {count(alone.get('steps'))} optimizer steps on the labeled rows"
        f"{_batches_and_rate(alone)}, at least as many as the distilled student's {count(student.get('steps'))}"
        f"{_batches_and_rate(student)}, so the baseline is not short of training.",
        "Latency and throughput were measured on the CPU for teacher and student side by side (interleaved rounds, "
        "median); the teacher's figures include every ensemble member.",
        f"Whole run: {seconds(metrics.get('seconds'))}.",
    ]
    images = {}
    if metrics.get("history"):
        images["learning_curves.png"] = plots.learning_curves(metrics["history"])
    points = [
        {"name": "teacher", "params": teacher["params"], "accuracy": teacher["accuracy"]},
        {"name": "student-alone", "params": alone["params"], "accuracy": alone["accuracy"]},
        {"name": "student-distilled", "params": student["params"], "accuracy": student["accuracy"]},
    ]
    images["accuracy_vs_params.png"] = plots.accuracy_vs_size(points)
    diagrams = {
        name: {**part["reliability"], "ece": part["ece"]}
        for name, part in (("teacher", teacher), ("student-alone", alone), ("student-distilled", student))
        if part.get("reliability")
    }
    if diagrams:
        images["reliability.png"] = plots.reliability(diagrams)
    return Report(
        title=f"distill report: {metrics['recipe']}",
        description=metrics.get("description", ""),
        summary=classification_summary(metrics),
        tables=[classification_table(metrics)],
        notes=notes,
        images=images,
    )


# ----------------------------------------------------------------------------------------------------------------
# Rendering
# ----------------------------------------------------------------------------------------------------------------


def markdown_table(table: Table) -> str:
    lines = ["| " + " | ".join(table.header) + " |", "|" + "|".join(" --- " for _ in table.header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in table.rows]
    return "\n".join(lines)


def to_markdown(report: Report) -> str:
    parts = [f"# {report.title}", "", report.description, ""]
    parts += [f"- {line}" for line in report.summary] + [""]
    for table in report.tables:
        parts += [f"## {table.title}", "", markdown_table(table), ""]
    if report.notes:
        parts += ["## Notes", ""] + [f"- {note}" for note in report.notes] + [""]
    if report.images:
        parts += ["## Plots", ""] + [f"![{name}]({name})" for name in report.images] + [""]
    return "\n".join(parts)


_STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; color: #222; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.92em; }
th, td { border: 1px solid #ccc; padding: 4px 10px; text-align: right; }
th:first-child, td:first-child { text-align: left; }
th { background: #f0f3f7; }
img { max-width: 100%; margin: 0.5em 0; }
"""


def _inline_bold(text: str) -> str:
    """Escape text, then render **bold** spans (the only markup summaries use)."""
    escaped = html.escape(text)
    pieces = escaped.split("**")
    return "".join(f"<strong>{p}</strong>" if i % 2 else p for i, p in enumerate(pieces))


def to_html(report: Report) -> str:
    """A single HTML file: tables, notes and the plots embedded as base64 PNG (no external files or scripts)."""
    body = [f"<h1>{html.escape(report.title)}</h1>", f"<p>{html.escape(report.description)}</p>"]
    body.append("<ul>" + "".join(f"<li>{_inline_bold(line)}</li>" for line in report.summary) + "</ul>")
    for table in report.tables:
        head = "".join(f"<th>{html.escape(h)}</th>" for h in table.header)
        rows = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in table.rows)
        body.append(f"<h2>{html.escape(table.title)}</h2><table><tr>{head}</tr>{rows}</table>")
    if report.notes:
        body.append("<h2>Notes</h2><ul>" + "".join(f"<li>{_inline_bold(n)}</li>" for n in report.notes) + "</ul>")
    for name, png in report.images.items():
        data = base64.b64encode(png).decode()
        body.append(f'<img alt="{html.escape(name)}" src="data:image/png;base64,{data}">')
    return (
        "<!doctype html><html><head><meta charset='utf-8'>"
        f"<title>{html.escape(report.title)}</title><style>{_STYLE}</style></head><body>"
        + "\n".join(body)
        + "</body></html>"
    )


def write(report: Report, directory: Path, metrics: dict[str, Any] | None = None) -> None:
    """Write report.md, report.html, the PNG plots and (when given) metrics.json into `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    for name, png in report.images.items():
        (directory / name).write_bytes(png)
    (directory / "report.md").write_text(to_markdown(report))
    (directory / "report.html").write_text(to_html(report))
    if metrics is not None:
        (directory / "metrics.json").write_text(json.dumps(metrics, indent=2, default=str))
