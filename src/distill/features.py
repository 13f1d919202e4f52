"""Feature distillation: capture named modules' outputs with forward hooks, and the losses between them.

Models are never edited: `capture` registers forward hooks on the named modules for the duration of a forward
pass and removes them afterwards. A `FeatureDistiller` holds the learned projections (when a student's width differs
from the teacher's) and turns captured student/teacher outputs into named loss terms:

    hidden_mse     FitNets (Romero et al. 2015), TinyBERT (Jiao et al. 2020):  mean over tokens of ||W h_s - h_t||^2 / d
    cosine         DistilBERT (Sanh et al. 2019):                               mean over tokens of 1 - cos(W h_s, h_t)
    attention_kl   MiniLM / MiniLMv2 (Wang et al. 2020, 2021): KL between the teacher's and the student's self-attention
                   distributions softmax(Q K^T / sqrt(d_r)), per query, over R relation heads (queries and keys of any
                   width are split into the same R heads, so teacher and student need not share head counts)

Token-level losses average over real tokens only (the attention mask); a pooled (B, D) output is one "token".
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distill.config import FeatureLoss
from distill.errors import DistillError, ShapeMismatchError

QUERY_NAMES = ("query", "q_proj", "q")
KEY_NAMES = ("key", "k_proj", "k")


def find_module(model: nn.Module, name: str, role: str = "model") -> nn.Module:
    """The submodule called `name`, or a DistillError listing the closest existing names."""
    modules = dict(model.named_modules())
    if name in modules:
        return modules[name]
    close = difflib.get_close_matches(name, list(modules), n=5, cutoff=0.5)
    hint = f"; close names: {', '.join(close)}" if close else ""
    raise DistillError(f"the {role} has no module named {name!r}{hint}")


def _first_tensor(output: Any) -> Tensor:
    if isinstance(output, Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]
    for attribute in ("last_hidden_state", "logits"):
        value = getattr(output, attribute, None)
        if isinstance(value, Tensor):
            return value
    raise DistillError(f"cannot take a tensor from a module output of type {type(output).__name__}")


def _attention_parts(module: nn.Module, name: str, role: str) -> tuple[str, str]:
    children = dict(module.named_children())
    query = next((q for q in QUERY_NAMES if q in children), None)
    key = next((k for k in KEY_NAMES if k in children), None)
    if query is None or key is None:
        raise DistillError(
            f"{role} module {name!r} is not a self-attention block with query/key projections "
            f"(children: {', '.join(children) or 'none'}); name the attention module, e.g. encoder.layer.5.attention.self"
        )
    return f"{name}.{query}", f"{name}.{key}"


def hook_names(model: nn.Module, pairs: Sequence[FeatureLoss], role: str) -> list[str]:
    """Every module whose output the `pairs` need from `model` (`role` is "student" or "teacher"), checked to exist."""
    names: list[str] = []
    for pair in pairs:
        name = pair.student if role == "student" else pair.teacher
        module = find_module(model, name, role)
        if pair.kind == "attention_kl":
            names += list(_attention_parts(module, name, role))
        else:
            names.append(name)
    return list(dict.fromkeys(names))


@contextmanager
def capture(model: nn.Module, names: Sequence[str]) -> Iterator[dict[str, Tensor]]:
    """Inside the block, `outputs[name]` is the (first tensor of the) latest output of each named module."""
    outputs: dict[str, Tensor] = {}
    handles = []
    for name in names:
        module = find_module(model, name)

        def hook(_module: nn.Module, _inputs: Any, output: Any, name: str = name) -> None:
            outputs[name] = _first_tensor(output)

        handles.append(module.register_forward_hook(hook))
    try:
        yield outputs
    finally:
        for handle in handles:
            handle.remove()


# ----------------------------------------------------------------------------------------------------------------
# The losses (each written once)
# ----------------------------------------------------------------------------------------------------------------


def _token_mean(values: Tensor, mask: Tensor | None) -> Tensor:
    """Mean of per-token values (B, T) over real tokens; (B,) values are averaged plainly."""
    if mask is None or values.dim() == 1:
        return values.mean()
    weights = mask.to(values.dtype)
    return (values * weights).sum() / weights.sum().clamp_min(1.0)


def hidden_mse(student: Tensor, teacher: Tensor, mask: Tensor | None = None) -> Tensor:
    """Mean squared error per element, averaged over real tokens: mean_t ||h_s - h_t||^2 / d. (..., d) -> scalar"""
    if student.shape != teacher.shape:
        raise ShapeMismatchError(
            f"hidden states differ in shape: student {tuple(student.shape)}, teacher {tuple(teacher.shape)}"
        )
    return _token_mean((student.float() - teacher.float()).pow(2).mean(-1), mask)


def cosine(student: Tensor, teacher: Tensor, mask: Tensor | None = None) -> Tensor:
    """1 - cosine similarity of the hidden vectors, averaged over real tokens (DistilBERT's L_cos). (..., d) -> scalar"""
    if student.shape != teacher.shape:
        raise ShapeMismatchError(
            f"hidden states differ in shape: student {tuple(student.shape)}, teacher {tuple(teacher.shape)}"
        )
    return _token_mean(1.0 - F.cosine_similarity(student.float(), teacher.float(), dim=-1), mask)


def attention_logits(query: Tensor, key: Tensor, heads: int, mask: Tensor | None) -> Tensor:
    """Scaled dot-product scores of R = `heads` relation heads: (B, T, d) x2 -> (B, R, T, T), masked keys -inf."""
    batch, length, width = query.shape
    if width % heads:
        raise ShapeMismatchError(f"attention width {width} is not divisible into {heads} relation heads")
    size = width // heads
    q = query.float().view(batch, length, heads, size).transpose(1, 2)  # (B, R, T, d_r)
    k = key.float().view(batch, length, heads, size).transpose(1, 2)  # (B, R, T, d_r)
    scores = q @ k.transpose(-1, -2) / math.sqrt(size)  # (B, R, T, T)
    if mask is not None:
        scores = scores.masked_fill(~mask.bool()[:, None, None, :], torch.finfo(scores.dtype).min)
    return scores


def attention_kl(
    student_qk: tuple[Tensor, Tensor], teacher_qk: tuple[Tensor, Tensor], heads: int, mask: Tensor | None = None
) -> Tensor:
    """KL(teacher attention || student attention) per relation head and query, averaged over real query tokens."""
    log_p = F.log_softmax(attention_logits(*teacher_qk, heads, mask), dim=-1)  # (B, R, T, T)
    log_q = F.log_softmax(attention_logits(*student_qk, heads, mask), dim=-1)  # (B, R, T, T)
    kl = F.kl_div(log_q, log_p, reduction="none", log_target=True).sum(-1).mean(1)  # (B, T)
    return _token_mean(kl, mask)


# ----------------------------------------------------------------------------------------------------------------
# Projections and the distiller
# ----------------------------------------------------------------------------------------------------------------


class FeatureDistiller(nn.Module):
    """The learned projections of feature distillation and the computation of its loss terms.

    Its parameters (one `Linear(d_student, d_teacher)` per hidden/cosine pair whose widths differ) are trained with the
    student and saved in its checkpoints, but are not part of the exported student.
    """

    def __init__(
        self,
        pairs: Sequence[FeatureLoss],
        student_widths: Sequence[int],
        teacher_widths: Sequence[int],
        student_hooks: Sequence[str] = (),
        teacher_hooks: Sequence[str] = (),
    ):
        super().__init__()
        self.pairs = list(pairs)
        self.student_hooks: list[str] = list(student_hooks)
        self.teacher_hooks: list[str] = list(teacher_hooks)
        self.projections = nn.ModuleDict()
        for index, (pair, ds, dt) in enumerate(zip(self.pairs, student_widths, teacher_widths, strict=True)):
            if pair.kind != "attention_kl" and ds != dt:
                self.projections[str(index)] = nn.Linear(ds, dt)

    @classmethod
    def build(
        cls, pairs: Sequence[FeatureLoss], student: nn.Module, teacher: nn.Module, example: dict[str, Tensor]
    ) -> FeatureDistiller:
        """Check every named module exists in both models and size the projections from one example batch."""
        student_hooks = hook_names(student, pairs, "student")
        teacher_hooks = hook_names(teacher, pairs, "teacher")
        widths = []
        for model, hooks, role in ((student, student_hooks, "student"), (teacher, teacher_hooks, "teacher")):
            sizes = dict(zip(hooks, output_widths(model, hooks, example), strict=True))
            widths.append([sizes.get(p.student if role == "student" else p.teacher, 0) for p in pairs])
        return cls(pairs, widths[0], widths[1], student_hooks, teacher_hooks)

    @staticmethod
    def term_name(pair: FeatureLoss) -> str:
        return f"{pair.kind}:{pair.student}"

    def forward(self, student: dict[str, Tensor], teacher: dict[str, Tensor], mask: Tensor | None) -> dict[str, Tensor]:
        terms: dict[str, Tensor] = {}
        for index, pair in enumerate(self.pairs):
            name = self.term_name(pair)
            if pair.kind == "attention_kl":
                s_names, t_names = pair.student, pair.teacher
                sq, sk = (student[n] for n in _qk_keys(student, s_names))
                tq, tk = (teacher[n] for n in _qk_keys(teacher, t_names))
                terms[name] = attention_kl((sq, sk), (tq, tk), pair.heads, mask)
                continue
            hs, ht = student[pair.student], teacher[pair.teacher]
            if str(index) in self.projections:
                hs = self.projections[str(index)](hs.float())
            loss = hidden_mse if pair.kind == "hidden_mse" else cosine
            terms[name] = loss(hs, ht, mask if hs.dim() == 3 else None)
        return terms


def _qk_keys(outputs: dict[str, Tensor], prefix: str) -> tuple[str, str]:
    query = next(f"{prefix}.{q}" for q in QUERY_NAMES if f"{prefix}.{q}" in outputs)
    key = next(f"{prefix}.{k}" for k in KEY_NAMES if f"{prefix}.{k}" in outputs)
    return query, key


def output_widths(model: nn.Module, names: Sequence[str], example: dict[str, Tensor]) -> list[int]:
    """The last dimension of each named module's output on one example batch (to size the projections)."""
    was_training = model.training
    model.eval()
    with torch.no_grad(), capture(model, names) as outputs:
        model(**example)
    model.train(was_training)
    return [int(outputs[name].shape[-1]) for name in names]
