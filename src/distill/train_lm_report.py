"""The report of `distill train-lm` (and its student's model card): on the held-out data (`eval_data`), the student
against its live teacher, side by side: held-out perplexity, KL to the teacher, next-token agreement, parameters,
size and tokens per second, with the share of the teacher's perplexity the student keeps; the training loss, its
settings (precision, accumulation, LoRA) and the learning curve. A student taught by a cache is scored alone (the
cache holds the teacher's top-k on the training data, not the held-out data)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from distill import hf, plots
from distill.errors import DistillError
from distill.evaluate import lm_scores, measure_speed
from distill.lm_data import LMDataset
from distill.lm_models import speed_inputs, weights_bytes
from distill.models import count_parameters
from distill.report import Report, Table, count, num, pct, ratio, seconds, size
from distill.teachers.local import to_device
from distill.token_align import token_bytes


def held_out_scores(
    student_dir: Path, teacher: nn.Module | None, data: LMDataset, device: torch.device, teacher_dir: str | None,
    *, teacher_data: LMDataset | None = None, byte_lengths: tuple[Tensor | None, Tensor | None] = (None, None),
) -> dict[str, dict[str, Any]]:  # fmt: skip
    """The saved student (and the live teacher) on `data`: scores, parameters, size, tokens per second (timed side
    by side on a batch of up to 16 held-out rows). A teacher of another tokenizer reads `teacher_data` (the same
    texts in its tokens) and the two compare in bits per byte (`byte_lengths`: the student's and the teacher's
    token lengths in bytes), not in KL or agreement."""
    student = hf.load_causal_lm(student_dir).to(device)
    models: dict[str, nn.Module] = {"student": student} if teacher is None else {"teacher": teacher.to(device),
                                                                                "student": student}  # fmt: skip
    same = teacher if teacher_data is None else None  # KL and agreement need one vocabulary
    rows = {"student": {**lm_scores(student, data, same, device=device, byte_lengths=byte_lengths[0]),
                        "size_bytes": weights_bytes(student_dir)}}  # fmt: skip
    if teacher is not None:
        folder = Path(teacher_dir) if teacher_dir is not None else None
        in_memory = sum(p.numel() * p.element_size() for p in teacher.parameters())
        scores = lm_scores(teacher, teacher_data or data, device=device, byte_lengths=byte_lengths[1])
        rows["teacher"] = {**scores,
                           "size_bytes": weights_bytes(folder) if folder and folder.is_dir() else in_memory}  # fmt: skip
    own = {"student": data} | ({} if teacher_data is None else {"teacher": teacher_data})  # each in its own tokens
    inputs = {name: tuple(to_device(x, device) for x in speed_inputs(rows_of)) for name, rows_of in own.items()}
    speed = measure_speed(models, *inputs["student"], rounds=3, min_seconds=0.1, inputs=inputs)
    for name, model in models.items():
        batch = inputs.get(name, inputs["student"])[1]
        tokens_per_row = float(batch["attention_mask"].sum()) / len(batch["input_ids"])
        rows[name].update(params=count_parameters(model), tokens_per_second=speed[name].throughput * tokens_per_row)
    return {name: rows[name] for name in models}


def byte_lengths(tokenizer: Any) -> Tensor | None:
    """(V,) each token's length in bytes of text (0 for a special token), for bits per byte; None for a tokenizer
    whose tokens' bytes cannot be read (`distill.token_align.token_bytes`)."""
    try:
        pieces = token_bytes(tokenizer)
    except DistillError:
        return None
    return torch.tensor([0 if piece is None else len(piece) for piece in pieces], dtype=torch.float64)


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
    header = ["model", "held-out perplexity", "bits per byte", "KL to teacher", "next-token agreement",
              "parameters", "size", "tokens/s"]  # fmt: skip
    body = [[name, num(m["perplexity"], 2), num(m.get("bits_per_byte"), 3), num(m.get("kl_to_teacher"), 3),
             pct(m.get("agreement")), count(m["params"]), size(m["size_bytes"]), count(round(m["tokens_per_second"]))]
            for name, m in rows.items()]  # fmt: skip
    return Table("Student vs teacher (held-out data)", header, body)


def _summary(metrics: dict[str, Any], rows: dict[str, dict[str, Any]]) -> list[str]:
    lines = []
    student, teacher = rows.get("student"), rows.get("teacher")
    if student is not None and teacher is not None and "agreement" not in student:  # another tokenizer
        lines.append(
            f"The teacher has another tokenizer, so they compare in bits per byte of held-out text: the student "
            f"**{num(student.get('bits_per_byte'), 3)}** against the teacher's {num(teacher.get('bits_per_byte'), 3)}"
            f", with {ratio(teacher['params'] / student['params'])} fewer parameters."
        )
    elif student is not None and teacher is not None:
        lines.append(
            f"The student keeps **{pct(teacher['perplexity'] / student['perplexity'])}** of the teacher's held-out "
            f"perplexity ({num(student['perplexity'], 2)} against {num(teacher['perplexity'], 2)}; teacher / "
            f"student) and agrees with its next token {pct(student['agreement'])} of the time, with "
            f"{ratio(teacher['params'] / student['params'])} fewer parameters and "
            f"{ratio(student['tokens_per_second'] / teacher['tokens_per_second'])} the tokens per second."
        )
    elif student is not None:
        lines.append(f"Held-out perplexity of the student: **{num(student['perplexity'], 2)}**.")
    alignment = metrics.get("alignment")
    if alignment:
        lines.append(
            f"Cross-tokenizer: {pct(alignment['coverage'])} of the student's scored positions had a teacher "
            f"distribution ({alignment['pairing']}); {pct(alignment['vocab_mapped'])} of the teacher's vocabulary "
            "maps to a student token of the same bytes."
        )
    if metrics.get("dropped_mass") is not None:
        lines.append(
            f"Padded vocabularies: the teacher's rows beyond the student's held at most "
            f"{metrics['dropped_mass']:.2e} of its probability at a scored position (dropped)."
        )
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
