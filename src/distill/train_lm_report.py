"""The report of `distill train-lm` (and its student's model card): on the held-out data (`eval_data`), the student
against its live teacher, side by side: held-out perplexity, KL to the teacher, next-token agreement, parameters,
size and tokens per second, with the share of the teacher's perplexity the student keeps; the training loss, its
settings (precision, accumulation, LoRA) and the learning curve. A student taught by a cache is scored alone (the
cache holds the teacher's top-k on the training data, not the held-out data)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from distill import hf, plots
from distill.evaluate import lm_scores, measure_speed
from distill.lm_data import LMDataset
from distill.lm_models import speed_inputs, weights_bytes
from distill.models import count_parameters
from distill.report import Report, Table, count, num, pct, ratio, seconds, size
from distill.teachers.local import to_device


def held_out_scores(
    student_dir: Path, teacher: nn.Module | None, data: LMDataset, device: torch.device, teacher_dir: str | None
) -> dict[str, dict[str, Any]]:
    """The saved student (and the live teacher) on `data`: scores, parameters, size, tokens per second (timed side
    by side on a batch of up to 16 held-out rows)."""
    student = hf.load_causal_lm(student_dir).to(device)
    models: dict[str, nn.Module] = {"student": student} if teacher is None else {"teacher": teacher.to(device),
                                                                                "student": student}  # fmt: skip
    rows = {"student": {**lm_scores(student, data, teacher, device=device), "size_bytes": weights_bytes(student_dir)}}
    if teacher is not None:
        folder = Path(teacher_dir) if teacher_dir is not None else None
        in_memory = sum(p.numel() * p.element_size() for p in teacher.parameters())
        rows["teacher"] = {**lm_scores(teacher, data, device=device),
                           "size_bytes": weights_bytes(folder) if folder and folder.is_dir() else in_memory}  # fmt: skip
    single, batch = (to_device(inputs, device) for inputs in speed_inputs(data))
    speed = measure_speed(models, single, batch, rounds=3, min_seconds=0.1)
    tokens_per_row = float(batch["attention_mask"].sum()) / len(batch["input_ids"])
    for name, model in models.items():
        rows[name].update(params=count_parameters(model), tokens_per_second=speed[name].throughput * tokens_per_row)
    return {name: rows[name] for name in models}


def report(metrics: dict[str, Any]) -> Report:
    """The train-lm report: the held-out table (when there was held-out data), the summary, how it was trained."""
    rows = metrics.get("eval_models", {})
    tables = [_held_out_table(rows)] if rows else []
    return Report(
        title="distill report: train-lm",
        description=metrics["description"],
        summary=_summary(metrics, rows),
        tables=tables,
        notes=_notes(metrics),
        images={"learning_curves.png": plots.learning_curves({"student": metrics["history"]}, "loss")},
    )


def _held_out_table(rows: dict[str, dict[str, Any]]) -> Table:
    header = ["model", "held-out perplexity", "KL to teacher", "next-token agreement", "parameters", "size",
              "tokens/s"]  # fmt: skip
    body = [[name, num(m["perplexity"], 2), num(m.get("kl_to_teacher"), 3), pct(m.get("agreement")),
             count(m["params"]), size(m["size_bytes"]), count(round(m["tokens_per_second"]))]
            for name, m in rows.items()]  # fmt: skip
    return Table("Student vs teacher (held-out data)", header, body)


def _summary(metrics: dict[str, Any], rows: dict[str, dict[str, Any]]) -> list[str]:
    lines = []
    student, teacher = rows.get("student"), rows.get("teacher")
    if student is not None and teacher is not None:
        lines.append(
            f"The student keeps **{pct(teacher['perplexity'] / student['perplexity'])}** of the teacher's held-out "
            f"perplexity ({num(student['perplexity'], 2)} against {num(teacher['perplexity'], 2)}; teacher / "
            f"student) and agrees with its next token {pct(student['agreement'])} of the time, with "
            f"{ratio(teacher['params'] / student['params'])} fewer parameters and "
            f"{ratio(student['tokens_per_second'] / teacher['tokens_per_second'])} the tokens per second."
        )
    elif student is not None:
        lines.append(f"Held-out perplexity of the student: **{num(student['perplexity'], 2)}**.")
    trainable = metrics.get("parameters", {})
    if metrics.get("adapter"):
        lines.append(
            f"LoRA: {count(trainable.get('trainable'))} of {count(trainable.get('total'))} parameters trained "
            f"(the adapter, {size(metrics.get('adapter_bytes'))}); the saved student is the merged model."
        )
    last = metrics["history"][-1] if metrics["history"] else {}
    if "loss" in last:
        lines.append(f"Training loss in the last epoch: {num(last['loss'], 4)}.")
    return lines


def _notes(metrics: dict[str, Any]) -> list[str]:
    loss, train = metrics["loss"], metrics["train"]
    taught = metrics["taught_by"]
    notes = [
        f"Loss: {loss['alpha']} x T^2 x {loss['divergence']}(teacher || student) + {1 - loss['alpha']:.2f} x "
        f"CE(next token), T = {loss['temperature']}, in chunks of {loss['chunk_size']} tokens; taught by {taught}."
        if taught != "nothing (fine-tuned alone)"
        else "Loss: CE(next token) (no teacher or cache: the student fine-tuned alone).",
        f"Training: {train['epochs']} epoch(s), batch {train['batch_size']} x {train['grad_accum_steps']} "
        f"accumulated, lr {train['lr']} ({train['schedule']}), precision {train['precision']}"
        + (", activation checkpointing" if train["activation_checkpointing"] else "")
        + f", strategy {train['strategy']}.",
        "Tokens per second: the models timed side by side on the same held-out batch.",
        f"Whole run: {seconds(metrics.get('seconds'))}.",
    ]
    return notes
