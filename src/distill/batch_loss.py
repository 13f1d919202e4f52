"""The loss of one batch: its named terms and their weights (`loss_terms`), and what each term averages over
(`term_units`), by which gradient accumulation weighs micro-batches.

Logit terms: `ce` alone without a teacher, else Hinton's `kd` and `ce` (`distill.losses.hinton_terms`), over all
positions of the output, or from the chunked LM path (`distill.lm.lm_terms`) for a causal LM with scored tokens.
Feature terms: one per configured pair of modules (`distill.features`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from distill.config import LossConfig
from distill.data import IGNORE
from distill.errors import DistillError, ShapeMismatchError
from distill.features import FeatureDistiller, capture
from distill.lm import is_causal_lm, lm_terms
from distill.losses import hard_label_ce, hinton_terms, hinton_weights
from distill.teachers import Teacher, TeacherOutput
from distill.teachers.local import logits_of, run_model


def loss_terms(
    model: nn.Module,
    batch: dict[str, Any],
    teacher: Teacher | None,
    loss: LossConfig,
    features: FeatureDistiller | None = None,
    fused: bool = False,
) -> tuple[dict[str, Tensor], dict[str, float]]:
    """The named loss terms of one batch and their weights in the total (with `fused`, the caller minimises exactly
    sum_k weights[k] * terms[k]: see `distill.lm.lm_terms`).

    Logit terms (`loss.logits`): `ce` alone without a teacher, else Hinton's `kd` (weight alpha) and `ce` (1 - alpha),
    over all positions of the output (rows, or tokens of a sequence). Feature terms: one per `loss.features` pair,
    named `kind:student_module`, weighted as configured.
    """
    if loss.logits and features is None and "kd_mask" in batch and loss.chunk_size and is_causal_lm(model):
        return lm_terms(model, batch, teacher, loss, fused=fused)
    with capture(model, features.student_hooks if features is not None else []) as captured:
        output = run_model(model, batch["inputs"])
    taught = teacher(batch) if teacher is not None else None
    terms: dict[str, Tensor] = {}
    weights: dict[str, float] = {}
    if loss.logits:
        terms, weights = _logit_terms(logits_of(output), batch, taught, loss)
    if features is not None:
        if taught is None or taught.hidden_states is None:
            raise DistillError("feature distillation needs a live teacher that captures the named modules")
        inputs = batch["inputs"]
        mask = inputs.get("attention_mask") if isinstance(inputs, Mapping) else None
        for pair, (name, value) in zip(features.pairs, features(captured, taught.hidden_states, mask).items()):
            terms[name], weights[name] = value, pair.weight
    return terms, weights


def _logit_terms(
    logits: Tensor, batch: dict[str, Any], taught: TeacherOutput | None, loss: LossConfig
) -> tuple[dict[str, Tensor], dict[str, float]]:
    """`ce` without a teacher; Hinton's `kd` and `ce` (on the rows that have a label) with one."""
    student_logits = logits.reshape(-1, logits.shape[-1])  # (N, C): rows, or every token position
    labels = batch.get("labels")
    flat_labels = labels.reshape(-1) if labels is not None else None  # (N,)
    if taught is None:
        if flat_labels is None:
            raise DistillError("training without a teacher needs labels")
        return {"ce": hard_label_ce(student_logits, flat_labels)}, {"ce": 1.0}
    if taught.logprobs is None:
        raise DistillError("the teacher gives no log-probs; set loss.logits to false to distill features only")
    width = taught.logprobs.shape[-1]
    if not taught.sparse and width != student_logits.shape[-1]:
        raise ShapeMismatchError(
            f"the teacher has {width} outputs but the student has {student_logits.shape[-1]}; "
            "they must predict the same classes"
        )
    device = student_logits.device
    ids = taught.token_ids
    terms = hinton_terms(
        student_logits,
        taught.logprobs.reshape(-1, width).to(device),  # (N, C), or (N, K) when sparse
        flat_labels,
        temperature=loss.temperature,
        token_ids=None if ids is None else ids.reshape(-1, width).to(device),  # (N, K)
        teacher_temperature=taught.temperature,
        divergence=loss.divergence,
        beta=loss.beta,
        kd_mask=_kd_mask(batch, taught, device),
    )
    return terms, hinton_weights(loss.alpha, terms)


def _kd_mask(batch: dict[str, Any], taught: TeacherOutput, device: torch.device) -> Tensor | None:
    """(N,) the positions the divergence counts: the batch's `kd_mask` (scored tokens) and the positions the teacher
    has a distribution for (`TeacherOutput.mask`); None = all."""
    kd_mask = batch.get("kd_mask")
    if taught.mask is not None:  # positions the teacher has no distribution for weigh 0
        covered = taught.mask.to(device)
        kd_mask = covered if kd_mask is None else kd_mask & covered
    return None if kd_mask is None else kd_mask.reshape(-1)


def term_units(batch: dict[str, Any], on_policy: bool = False) -> dict[str, float]:
    """What each kind of term of `batch` averages over, counted: `kd` its scored positions (`kd_mask`; its rows
    without one), `ce` its labeled rows or tokens (none on an on-policy batch, which has no `ce`), `rows` (feature
    terms) its rows."""
    index, labels, kd_mask = batch.get("index"), batch.get("labels"), batch.get("kd_mask")
    rows = float(len(index)) if isinstance(index, Tensor) else 1.0
    return {
        "kd": float(kd_mask.sum()) if isinstance(kd_mask, Tensor) else rows,
        "ce": float((labels != IGNORE).sum()) if isinstance(labels, Tensor) and not on_policy else 0.0,
        "rows": rows,
    }


def unit_of(term: str) -> str:
    """The key of `term_units` that term `term` averages over."""
    return term if term in ("kd", "ce") else "rows"


def add_units(units: Iterable[dict[str, float]]) -> dict[str, float]:
    """The units of several batches added up, key by key."""
    totals: dict[str, float] = {}
    for one in units:
        for key, value in one.items():
            totals[key] = totals.get(key, 0.0) + value
    return totals
