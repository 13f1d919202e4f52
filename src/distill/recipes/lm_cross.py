"""The lm recipe with a student of another tokenizer (`distill run --recipe lm --student-tokenizer other`).

The teacher keeps the recipe's byte-level BPE; the students get a SentencePiece-style unigram tokenizer of their own
(another family, as a Llama-2 or T5 student of a GPT-2 or Llama-3 teacher), trained on the same texts. Students of
one size, on the same texts and steps:

* `student-alone`: the hard-label loss only;
* `student-seq-kd`: sequence-level KD (Kim and Rush 2016): trained alone on text the teacher sampled, one sample
  per training text, started from its first word;
* `student-uld`: the Universal Logit Distillation loss (Boizard et al. 2024) against the teacher's cached top-k,
  the j-th completion token of both paired;
* `student-aligned`: token-level KD through alignment by bytes (`distill.teachers.cross`) from the same cache;
* for reference, with the teacher's own tokenizer: `same-tokenizer-alone` and `same-tokenizer-distilled`.

Every model is scored in bits per byte of the held-out texts, which does not depend on the tokenizer.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from distill import evaluate, plots
from distill.lm_data import Example, LMDataset, tokenize_examples
from distill.lm_models import run_tokenizer, weights_bytes
from distill.models import count_parameters
from distill.report import Report, Table, count, num, pct, seconds, size
from distill.stages import RunContext
from distill.teachers.cross import CrossTokenizerTeacher
from distill.teachers.token_cache import TokenCache, verify_token_cache
from distill.train_lm_report import byte_lengths
from distill.train_lm_teacher import CACHE_TOKENIZER

GENERATION_BATCH = 64


def run_other_tokenizer(config: Any, context: RunContext, train_texts: list[str], held_out_texts: list[str], *,
                        fit: Callable[..., Any], cache: Callable[..., Path]) -> dict[str, Any]:  # fmt: skip
    """Tokenizers, teacher, cache, the students, scores; the metrics. `config` is the lm recipe's `LMConfig`; `fit`
    and `cache` are its stages (a model trained or loaded when a resumed run finished it; the teacher's cache)."""
    out = context.output
    tokenizers = {"teacher": run_tokenizer(train_texts, config.vocab_size, out / "tokenizer", context.resume),
                  "student": run_tokenizer(train_texts, config.student_vocab_size, out / "student-tokenizer",
                                           context.resume, kind="unigram")}  # fmt: skip
    student_texts = train_texts[: config.student_sample_size or None]
    examples, held_out = [Example("", t) for t in student_texts], [Example("", t) for t in held_out_texts]
    everything = tokenize_examples(tokenizers["teacher"], [Example("", t) for t in train_texts], config.max_length)
    teacher, record = fit("teacher", config, config.teacher, tokenizers["teacher"], everything, context,
                           teacher=None, train_config=config.teacher_train, seed=config.seed)  # fmt: skip
    trained = {"teacher": (teacher, record, "teacher")}
    data = {side: tokenize_examples(tok, examples, config.max_length) for side, tok in tokenizers.items()}
    cache_path = cache(teacher, data["teacher"], tokenizers["teacher"], config, context)
    tokenizers["teacher"].save_pretrained(cache_path / CACHE_TOKENIZER)
    sampled = teacher_samples(teacher, tokenizers["teacher"], student_texts, config, context)
    crosses = {kind: CrossTokenizerTeacher(TokenCache(cache_path), tokenizers["teacher"], tokenizers["student"],
                                           teacher_data=data["teacher"], max_length=config.max_length,
                                           top_k=config.top_k, uld=kind == "uld",
                                           vocabulary="prefix" if kind == "prefix" else "exact")
               for kind in ("exact", "prefix", "uld")}  # fmt: skip
    uld_loss = config.loss.model_copy(update={"divergence": "uld"})
    plan: list[tuple[str, str, LMDataset, Any, Any]] = [
        ("student-alone", "student", data["student"], None, None),
        ("student-seq-kd", "student", tokenize_examples(tokenizers["student"], sampled, config.max_length), None, None),
        ("student-uld", "student", data["student"], crosses["uld"], uld_loss),
        ("student-aligned", "student", data["student"], crosses["exact"], None),
        ("student-aligned-prefix", "student", data["student"], crosses["prefix"], None),
        ("same-tokenizer-alone", "teacher", data["teacher"], None, None),
        ("same-tokenizer-distilled", "teacher", data["teacher"], TokenCache(cache_path), None),
    ]
    for name, side, rows, source, loss in plan:
        model, record = fit(name, config, config.student, tokenizers[side], rows, context, teacher=source,
                             train_config=config.student_train, seed=config.seed + 1, loss=loss)  # fmt: skip
        trained[name] = (model, record, side)
    context.reporter.stage("evaluate", total=None)
    scores = _scores(trained, tokenizers, held_out, config, context)
    context.reporter.end()
    shutil.copytree(out / "models" / "student-aligned", out / "student", dirs_exist_ok=True)
    return {
        "recipe": "lm",
        "student_tokenizer": "other",
        "description": (
            f"{len(train_texts)} training texts ({len(student_texts)} for the students) and {len(held_out_texts)} "
            f"held-out texts; teacher: byte-level BPE of "
            f"{len(tokenizers['teacher'])} tokens, GPT-2 {config.teacher}; students: GPT-2 {config.student} with a "
            f"SentencePiece-style unigram of {len(tokenizers['student'])} tokens; cache top-{config.top_k}"
        ),
        "models": scores,
        "alignment": {
            "coverage": crosses["exact"].data_coverage(data["student"]),
            "uld_coverage": crosses["uld"].data_coverage(data["student"]),
            "vocab_mapped": crosses["exact"].map.mapped / crosses["exact"].map.teacher_size,
            "prefix_mapped": crosses["prefix"].map.mapped / crosses["prefix"].map.teacher_size,
        },  # fmt: skip
        "recovery": recovery(scores),
        "recovery_prefix": recovery(scores, "student-aligned-prefix"),
        "cache": verify_token_cache(cache_path),
        "loss": config.loss.model_dump(),
    }


@torch.no_grad()
def teacher_samples(
    teacher: nn.Module, tokenizer: Any, texts: list[str], config: Any, context: RunContext
) -> list[Example]:
    """Sequence-level KD's data: for each text, the teacher's sample (temperature 1) after the text's first word."""
    starts = [text.split()[0] if text.split() else text for text in texts]
    samples: list[Example] = []
    context.reporter.stage("teacher samples (sequence-level KD)", total=len(starts))
    torch.manual_seed(config.seed)
    tokenizer.padding_side = "left"
    for first in range(0, len(starts), GENERATION_BATCH):
        chunk = starts[first : first + GENERATION_BATCH]
        inputs = tokenizer(chunk, return_tensors="pt", padding=True, add_special_tokens=False, truncation=True,
                           max_length=8)  # fmt: skip
        generated = teacher.generate(  # type: ignore[operator]
            **inputs, do_sample=True, temperature=1.0, top_k=0,
            max_new_tokens=config.max_length - inputs["input_ids"].shape[1],
            pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        )[:, inputs["input_ids"].shape[1] :]  # fmt: skip
        texts_out = tokenizer.batch_decode(generated, skip_special_tokens=True)
        samples += [Example("", (start + text).strip() or start) for start, text in zip(chunk, texts_out)]
        context.reporter.advance(len(chunk))
    tokenizer.padding_side = "right"
    context.reporter.end()
    return samples


def _scores(trained: dict[str, tuple[nn.Module, dict[str, Any], str]], tokenizers: dict[str, Any],
            held_out: list[Example], config: Any, context: RunContext) -> dict[str, Any]:  # fmt: skip
    """Every model on the held-out texts in its own tokens: bits per byte, perplexity per own token, time."""
    rows: dict[str, Any] = {}
    for name, (model, record, side) in trained.items():
        data = tokenize_examples(tokenizers[side], held_out, config.max_length)
        scored = evaluate.lm_scores(model, data, byte_lengths=byte_lengths(tokenizers[side]))
        rows[name] = {
            **scored,
            "tokenizer": f"{'BPE' if side == 'teacher' else 'unigram'} {len(tokenizers[side]):,}",
            "params": count_parameters(model),
            "size_bytes": weights_bytes(context.output / "models" / name),
            "history": record["history"],
            "train_seconds": record["seconds"],
            "step_seconds": record["seconds"] / max(record["steps"], 1),
        }
    return rows


def recovery(rows: dict[str, Any], student: str = "student-aligned") -> float | None:
    """The share of the same-tokenizer student's gain over its alone twin (in bits per byte) that `student`, of the
    other tokenizer, gains over its own alone twin."""
    same = rows["same-tokenizer-alone"]["bits_per_byte"] - rows["same-tokenizer-distilled"]["bits_per_byte"]
    other = rows["student-alone"]["bits_per_byte"] - rows[student]["bits_per_byte"]
    return other / same if same > 0 else None


def report_other_tokenizer(metrics: dict[str, Any]) -> Report:
    """Bits per byte of the teacher and every student, the alignment's coverage, the time per step."""
    header = ["model", "tokenizer", "held-out bits per byte", "perplexity (own tokens)", "parameters", "size",
              "time per step", "train time"]  # fmt: skip
    body = [[name, m["tokenizer"], num(m["bits_per_byte"], 4), num(m["perplexity"], 2), count(m["params"]),
             size(m.get("size_bytes")), seconds(m["step_seconds"]), seconds(m["train_seconds"])]
            for name, m in metrics["models"].items()]  # fmt: skip
    rows, alignment = metrics["models"], metrics["alignment"]
    bpb = {name: m["bits_per_byte"] for name, m in rows.items()}
    summary = [
        f"A student with another tokenizer, taught token by token through alignment by bytes, reaches "
        f"**{num(bpb['student-aligned'], 4)}** bits per byte on held-out text against {num(bpb['student-alone'], 4)} "
        f"alone, {num(bpb['student-seq-kd'], 4)} with sequence-level KD and {num(bpb['student-uld'], 4)} with ULD "
        f"(teacher {num(bpb['teacher'], 4)}).",
        f"It recovers **{pct(metrics['recovery'])}** of the gain a student of the teacher's own tokenizer gets from "
        f"the same cache ({num(bpb['same-tokenizer-alone'], 4)} to {num(bpb['same-tokenizer-distilled'], 4)}); "
        f"with the teacher's tokens carried to their longest student prefix instead of the tail, "
        f"{num(bpb['student-aligned-prefix'], 4)} bits per byte and {pct(metrics.get('recovery_prefix'))}.",
        f"{pct(alignment['coverage'])} of the student's positions were aligned with a teacher position; "
        f"{pct(alignment['vocab_mapped'])} of the teacher's vocabulary maps to a student token of the same bytes.",
    ]
    notes = [
        "Bits per byte: the summed cross-entropy (in bits) of each model's tokens over the UTF-8 bytes of the "
        "held-out texts, so models of different tokenizers compare; perplexity is per each model's own token. A "
        "text's first token follows nothing (no BOS), so it and its bytes are left out for every model.",
        "Aligned: at a student position where both tokenizations start a token at the same byte, the teacher's "
        "cached top-k next tokens are carried to the student's tokens of the same bytes (the rest to the tail "
        "bucket); positions inside a span weigh 0 in the divergence. ULD pairs the j-th tokens of both.",
        f"Whole run: {seconds(metrics.get('seconds'))}.",
    ]
    histories = {name: m["history"] for name, m in rows.items()}
    return Report(
        title="distill report: lm, a student of another tokenizer",
        description=metrics["description"],
        summary=summary,
        tables=[Table("Teacher vs students (held-out texts)", header, body)],
        notes=notes,
        images={"learning_curves.png": plots.learning_curves(histories, "loss")},
    )
