"""Logit distillation losses, each written once, as pure functions.

Notation: the teacher distribution is p, the student distribution is q, both over the same classes (or vocabulary),
both softened by a temperature T: q = softmax(z_s / T), p = softmax(z_t / T).

A teacher is given either

* **dense**: log-probabilities over all V classes, shape (N, V); or
* **sparse**: its top-K log-probabilities and their class ids, shapes (N, K) and (N, K). The student's log-probs
  are gathered at those ids and one *tail bucket* holds the remaining mass on both sides, so both distributions
  live on K + 1 buckets and every divergence below applies unchanged. With K == V the tail is empty and the sparse
  loss equals the dense one. An id of -1 marks an *empty* entry (padding, e.g. a teacher token with no counterpart
  in the student's vocabulary): its bucket is LOG_FLOOR on both sides and both tails hold the mass outside the
  valid ids, so the loss equals that of the same row without the entry.

`uld` (Boizard et al. 2024) is the exception: it compares the two distributions' sorted probabilities, so its
teacher may have any number K of entries (another vocabulary) and the ids play no part.

Every divergence returns the mean over the rows selected by `mask` (all rows when `mask` is None). Log-probabilities
are floored at LOG_FLOOR (e^-100, about 4e-44) so that a zero-probability bucket contributes zero instead of NaN.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from distill.errors import ShapeMismatchError

LOG_FLOOR = -100.0
# A teacher top-K mass within this of 1 is float32 rounding, not a real tail: treat the tail as empty.
TAIL_EPS = 1e-6


# ----------------------------------------------------------------------------------------------------------------
# Putting student and teacher on the same buckets
# ----------------------------------------------------------------------------------------------------------------


def dense_pair(
    student_logits: Tensor, teacher_logprobs: Tensor, temperature: float, teacher_temperature: float = 1.0
) -> tuple[Tensor, Tensor]:
    """Student and teacher log-probs at temperature T over all V classes.

    `teacher_logprobs` are normalised log-probs at temperature `teacher_temperature`: since log_softmax(z / t0) =
    z / t0 - const, rescaling by t0 / T and renormalising gives log_softmax(z / T) exactly (when t0 == T they are
    used as they are, so they must be normalised).
    """
    check_same_shape(student_logits, teacher_logprobs)
    scaled = student_logits.float() if temperature == 1.0 else student_logits.float() / temperature
    student = F.log_softmax(scaled, dim=-1)  # (N, V)
    ratio = teacher_temperature / temperature
    if ratio == 1.0:  # already log-probs at T (a teacher's outputs are normalised)
        teacher = teacher_logprobs.float()  # (N, V)
    else:
        teacher = F.log_softmax(teacher_logprobs.float() * ratio, dim=-1)  # (N, V)
    return student, teacher


def check_same_shape(student_logits: Tensor, teacher_logprobs: Tensor) -> None:
    """A dense teacher gives one log-prob per class of the student's, at every position."""
    if student_logits.shape != teacher_logprobs.shape:
        raise ShapeMismatchError(
            f"student outputs shape {tuple(student_logits.shape)} but teacher outputs {tuple(teacher_logprobs.shape)}"
        )


def sparse_pair(
    student_logits: Tensor, teacher_logprobs: Tensor, token_ids: Tensor, temperature: float
) -> tuple[Tensor, Tensor]:
    """Student and teacher log-probs over K + 1 buckets: the teacher's top-K ids, then the tail.

    The teacher's top-K log-probs must already be at temperature T (a cache records the temperature it was built at;
    the tail's shape at another temperature is unknown). The student's tail is the exact log-sum-exp of its
    log-probs outside the K ids, so no probability mass is invented on either side. An id of -1 is an empty entry:
    LOG_FLOOR on both sides, left out of both tails' complements, so it changes nothing.
    """
    vocab = student_logits.shape[-1]
    ids = checked_ids(student_logits, teacher_logprobs, token_ids)  # (N, K)
    empty = ids < 0  # (N, K), the -1 entries
    scaled = student_logits.float() if temperature == 1.0 else student_logits.float() / temperature  # (N, V)
    student_all = F.log_softmax(scaled, dim=-1)  # (N, V)
    student_top = student_all.gather(-1, ids.clamp_min(0)).masked_fill(empty, LOG_FLOOR)  # (N, K)
    student_tail = _tail_logsumexp(student_all, ids.masked_fill(empty, vocab))  # (N,)

    teacher_top = teacher_logprobs.float().masked_fill(empty, LOG_FLOOR)  # (N, K)
    tail_mass = 1.0 - teacher_top.exp().masked_fill(empty, 0.0).sum(-1)  # (N,)
    tail_mass = torch.where(tail_mass > TAIL_EPS, tail_mass, torch.zeros_like(tail_mass))
    teacher_tail = torch.log(tail_mass)  # (N,), -inf when empty

    student = torch.cat([student_top, student_tail.unsqueeze(-1)], dim=-1)  # (N, K+1)
    teacher = torch.cat([teacher_top, teacher_tail.unsqueeze(-1)], dim=-1)  # (N, K+1)
    return student, teacher


def checked_ids(student_logits: Tensor, teacher_logprobs: Tensor, token_ids: Tensor) -> Tensor:
    """The sparse teacher's ids as int64 (N, K), after checking that they fit its log-probs (N, K) and the student's
    logits (N, V)."""
    if teacher_logprobs.shape != token_ids.shape:
        raise ShapeMismatchError(
            f"teacher top-k log-probs {tuple(teacher_logprobs.shape)} and ids {tuple(token_ids.shape)} differ"
        )
    if student_logits.shape[:-1] != token_ids.shape[:-1]:
        raise ShapeMismatchError(
            f"student outputs {tuple(student_logits.shape)} but teacher top-k ids are {tuple(token_ids.shape)}"
        )
    ids = token_ids.long()  # (N, K)
    _check_ids(ids, student_logits.shape[-1])
    return ids


def _check_ids(ids: Tensor, vocab: int) -> None:
    """Every id is a class of the student's `vocab`, or -1 for an empty entry."""
    if not ids.numel():
        return
    if int(ids.max()) >= vocab:
        raise ShapeMismatchError(f"teacher token id {int(ids.max())} is outside the student's {vocab} classes")
    if int(ids.min()) < -1:
        raise ShapeMismatchError(f"teacher token id {int(ids.min())} is invalid (-1 marks an empty entry)")


def _tail_logsumexp(student_all: Tensor, slots: Tensor) -> Tensor:
    """log of the student's mass outside the classes in `slots` (N, K), where the value V (one past the last class)
    marks an empty entry: the chosen mask is scattered into V + 1 columns and the extra one dropped. (N, V) -> (N,)"""
    vocab = student_all.shape[-1]
    chosen = student_all.new_zeros((*student_all.shape[:-1], vocab + 1), dtype=torch.bool)  # (N, V+1)
    chosen = chosen.scatter_(-1, slots, True)[..., :vocab]  # (N, V)
    # A finite fill keeps the gradient finite when every class is chosen (K == V).
    return torch.logsumexp(student_all.masked_fill(chosen, torch.finfo(student_all.dtype).min), dim=-1)  # (N,)


def buckets(
    student_logits: Tensor,
    teacher_logprobs: Tensor,
    token_ids: Tensor | None,
    temperature: float,
    teacher_temperature: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """Dense when `token_ids` is None, sparse otherwise. The teacher's log-probs (and the sparse student's tail) are
    floored at LOG_FLOOR; a dense student's log_softmax of finite logits is finite and is left as it is."""
    if token_ids is None:
        student, teacher = dense_pair(student_logits, teacher_logprobs, temperature, teacher_temperature)
        return student, teacher.clamp_min(LOG_FLOOR)
    if not math.isclose(teacher_temperature, temperature, rel_tol=1e-6):
        raise ShapeMismatchError(
            f"sparse teacher log-probs were computed at temperature {teacher_temperature} but the loss uses "
            f"{temperature}; rebuild the cache at that temperature or set the loss temperature to match"
        )
    student, teacher = sparse_pair(student_logits, teacher_logprobs, token_ids, temperature)
    return student.clamp_min(LOG_FLOOR), teacher.clamp_min(LOG_FLOOR)


def _mean(rows: Tensor, mask: Tensor | None) -> Tensor:
    """Mean of per-row values over the rows where `mask` is true (zero, with a gradient, when none are)."""
    if mask is None:
        return rows.mean()
    weights = mask.to(rows.dtype)
    return (rows * weights).sum() / weights.sum().clamp_min(1.0)


# ----------------------------------------------------------------------------------------------------------------
# Divergences between bucket log-probs (N, B): the math lives here, once
# ----------------------------------------------------------------------------------------------------------------


def kl_rows(log_p: Tensor, log_q: Tensor) -> Tensor:
    """KL(p || q) = sum_i p_i (log p_i - log q_i), per row. (N, B) -> (N,)

    Computed by `F.kl_div(log q, log p, log_target=True)`, which fuses the element-wise terms in one kernel each way.
    """
    return F.kl_div(log_q, log_p, reduction="none", log_target=True).sum(-1)


def jsd_rows(log_p: Tensor, log_q: Tensor, beta: float) -> Tensor:
    """Generalised Jensen-Shannon divergence of Agarwal et al. 2024 (GKD, "On-Policy Distillation of Language
    Models"), per row, with the mixture m = beta p + (1 - beta) q:

        JSD_beta(p || q) = beta KL(p || m) + (1 - beta) KL(q || m)

    beta = 0.5 is the symmetric JSD. As in TRL's GKD trainer, beta = 0 means forward KL(p || q) and beta = 1 means
    reverse KL(q || p) (the interpolation itself vanishes at both ends).
    """
    if beta <= 0.0:
        return kl_rows(log_p, log_q)
    if beta >= 1.0:
        return kl_rows(log_q, log_p)
    rows: Tensor = _JSDRows.apply(log_p, log_q, beta)
    return rows


class _JSDRows(torch.autograd.Function):
    """`jsd_rows` for 0 < beta < 1 with its gradient in closed form. With m = beta p + (1 - beta) q,

        d JSD / d log p_i = beta p_i (log p_i - log m_i),      d JSD / d log q_i = (1 - beta) q_i (log q_i - log m_i)

    (through m, d/dq_i gives -(1 - beta) (beta p_i + (1 - beta) q_i) / m_i = -(1 - beta), which cancels the
    +(1 - beta) of d(q_i log q_i); likewise for p), so backward is one element-wise product per input, where
    autograd through the mixture's log-sum-exp and both KLs took some ten passes over the (N, B) tensors and kept as
    many (a JSD block of the chunked LM loss: 110 -> 48 ms at (131, 32000) on a CPU thread). log m is formed by
    `logaddexp`, stable for any log-probs (a term whose probability underflows to zero contributes zero)."""

    @staticmethod
    def forward(ctx: Any, log_p: Tensor, log_q: Tensor, beta: float) -> Tensor:
        log_m = torch.logaddexp(log_p + math.log(beta), log_q + math.log(1.0 - beta))  # (N, B)
        p, q = log_p.exp(), log_q.exp()  # (N, B)
        from_p, from_q = log_p - log_m, log_q - log_m  # (N, B): log(p / m), log(q / m)
        rows = beta * (p * from_p).sum(-1) + (1.0 - beta) * (q * from_q).sum(-1)  # (N,)
        wants_p, wants_q = ctx.needs_input_grad[:2]
        ctx.save_for_backward(p if wants_p else None, from_p if wants_p else None, q if wants_q else None,
                              from_q if wants_q else None)  # fmt: skip
        ctx.beta = beta
        return rows

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, Tensor | None, None]:
        p, from_p, q, from_q = ctx.saved_tensors
        grad = grad.unsqueeze(-1)  # (N, 1)
        grad_p = None if p is None else (grad * ctx.beta) * p * from_p  # (N, B)
        grad_q = None if q is None else (grad * (1.0 - ctx.beta)) * q * from_q  # (N, B)
        return grad_p, grad_q, None


def tvd_rows(log_p: Tensor, log_q: Tensor) -> Tensor:
    """Total variation distance, 0.5 * sum_i |p_i - q_i|, per row (Wen et al. 2023, "f-Divergence Minimization for
    Sequence-Level Knowledge Distillation")."""
    return 0.5 * (log_p.exp() - log_q.exp()).abs().sum(-1)


def uld_rows(p_sorted: Tensor, log_q: Tensor) -> Tensor:
    """The Universal Logit Distillation distance of Boizard et al. 2024 per row, between the teacher's probabilities
    sorted in decreasing order p_sorted (N, K) and the student's log-probs log_q (N, V), K and V free:

        ULD(p, q) = sum_r |q_(r) - p_(r)|     over ranks r, the shorter vector padded with zeros
                  = sum_{r <= k} |q_(r) - p_(r)| + sum_{r > k} q_(r) + sum_{r > k} p_(r),    k = min(K, V)

    with sum_{r > k} q_(r) = 1 - sum_{r <= k} q_(r), so only the student's top k is needed, not a full sort.
    (N, K), (N, V) -> (N,)
    """
    k = min(p_sorted.shape[-1], log_q.shape[-1])
    q_top = log_q.topk(k, dim=-1).values.exp()  # (N, k), decreasing
    ranked = (q_top - p_sorted[..., :k]).abs().sum(-1)  # (N,)
    if k < log_q.shape[-1]:  # K < V: the teacher has no ranks beyond k, the student's hold 1 - sum of its top k
        return ranked + (1.0 - q_top.sum(-1))
    return ranked + p_sorted[..., k:].sum(-1)  # K >= V: the student has none beyond k (exactly, not by rounding)


# ----------------------------------------------------------------------------------------------------------------
# Public losses: student logits against a dense or sparse teacher
# ----------------------------------------------------------------------------------------------------------------


def forward_kl(
    student_logits: Tensor,
    teacher_logprobs: Tensor,
    *,
    token_ids: Tensor | None = None,
    temperature: float = 1.0,
    teacher_temperature: float = 1.0,
    mask: Tensor | None = None,
    beta: float = 0.5,
) -> Tensor:
    """Forward KL(p || q), mode-covering; Hinton et al. 2015 ("Distilling the Knowledge in a Neural Network").

    Equals the soft cross-entropy -sum p log q minus the teacher's entropy, which does not depend on the student:
    the gradients are identical and the loss is zero when the student matches the teacher. `beta` is ignored.
    """
    student, teacher = buckets(student_logits, teacher_logprobs, token_ids, temperature, teacher_temperature)
    if mask is None:  # one fused kernel each way: sum of KL over rows / rows
        return F.kl_div(student.flatten(0, -2), teacher.flatten(0, -2), reduction="batchmean", log_target=True)
    return _mean(kl_rows(teacher, student), mask)


def reverse_kl(
    student_logits: Tensor,
    teacher_logprobs: Tensor,
    *,
    token_ids: Tensor | None = None,
    temperature: float = 1.0,
    teacher_temperature: float = 1.0,
    mask: Tensor | None = None,
    beta: float = 0.5,
) -> Tensor:
    """Reverse KL(q || p), mode-seeking; Gu et al. 2024 ("MiniLLM"). `beta` is ignored."""
    student, teacher = buckets(student_logits, teacher_logprobs, token_ids, temperature, teacher_temperature)
    return _mean(kl_rows(student, teacher), mask)


def jsd(
    student_logits: Tensor,
    teacher_logprobs: Tensor,
    *,
    token_ids: Tensor | None = None,
    temperature: float = 1.0,
    teacher_temperature: float = 1.0,
    mask: Tensor | None = None,
    beta: float = 0.5,
) -> Tensor:
    """Generalised JSD_beta(p || q) of GKD (Agarwal et al. 2024); see `jsd_rows`."""
    student, teacher = buckets(student_logits, teacher_logprobs, token_ids, temperature, teacher_temperature)
    return _mean(jsd_rows(teacher, student, beta), mask)


def tvd(
    student_logits: Tensor,
    teacher_logprobs: Tensor,
    *,
    token_ids: Tensor | None = None,
    temperature: float = 1.0,
    teacher_temperature: float = 1.0,
    mask: Tensor | None = None,
    beta: float = 0.5,
) -> Tensor:
    """Total variation distance between p and q; see `tvd_rows`. `beta` is ignored."""
    student, teacher = buckets(student_logits, teacher_logprobs, token_ids, temperature, teacher_temperature)
    return _mean(tvd_rows(teacher, student), mask)


def uld(
    student_logits: Tensor,
    teacher_logprobs: Tensor,
    *,
    token_ids: Tensor | None = None,
    temperature: float = 1.0,
    teacher_temperature: float = 1.0,
    mask: Tensor | None = None,
    beta: float = 0.5,
) -> Tensor:
    """The Universal Logit Distillation loss of Boizard et al. 2024 ("Towards Cross-Tokenizer Distillation: the
    Universal Logit Distillation Loss for LLMs", arXiv 2402.12030): the Wasserstein-1 distance between teacher and
    student distributions over *different* vocabularies, which under the paper's uniform transport cost is

        ULD(p, q) = sum_r |q_(r) - p_(r)|,     q = softmax(z_s / T) (N, V), p the teacher's (N, K) at T

    over the ranks r of each one's probabilities sorted in decreasing order, the shorter vector padded with zeros
    (`uld_rows`). The teacher is its K most likely tokens' log-probs (any K, any order; beyond K it counts as zero)
    or its full distribution. Given at another `teacher_temperature`, they are rescaled to T and renormalised,
    which is exact only for a full distribution: a truncated top-K must be given at T. `token_ids` play no part
    (a sparse cache's top-K works as it is; -1 entries have LOG_FLOOR log-probs, zero mass). `beta` is ignored.
    """
    if student_logits.shape[:-1] != teacher_logprobs.shape[:-1]:
        raise ShapeMismatchError(
            f"student outputs {tuple(student_logits.shape)} but teacher outputs {tuple(teacher_logprobs.shape)}"
        )
    if token_ids is not None and token_ids.shape != teacher_logprobs.shape:
        raise ShapeMismatchError(
            f"teacher top-k log-probs {tuple(teacher_logprobs.shape)} and ids {tuple(token_ids.shape)} differ"
        )
    student = F.log_softmax(student_logits.float() / temperature, dim=-1)  # (N, V)
    teacher = _uld_teacher(teacher_logprobs, temperature, teacher_temperature)  # (N, K)
    return _mean(uld_rows(teacher, student), mask)


def _uld_teacher(teacher_logprobs: Tensor, temperature: float, teacher_temperature: float) -> Tensor:
    """The teacher's probabilities at T sorted in decreasing order. (N, K) -> (N, K)"""
    teacher = teacher_logprobs.float()  # (N, K)
    if not math.isclose(teacher_temperature, temperature, rel_tol=1e-6):
        if teacher.numel() and float(teacher.exp().sum(-1).min()) < 1.0 - 1e-3:
            raise ShapeMismatchError(
                f"the teacher's log-probs at temperature {teacher_temperature} cover only part of its mass, so they "
                f"cannot be rescaled to the loss temperature {temperature}; give its top-K at {temperature}"
            )
        teacher = F.log_softmax(teacher * (teacher_temperature / temperature), dim=-1)  # (N, K) at T
    return teacher.exp().sort(dim=-1, descending=True).values  # (N, K)


Divergence = Callable[..., Tensor]

LOSSES: dict[str, Divergence] = {
    "forward_kl": forward_kl,
    "reverse_kl": reverse_kl,
    "jsd": jsd,
    "tvd": tvd,
    "uld": uld,
}


def hard_label_ce(student_logits: Tensor, labels: Tensor, ignore_index: int = -100) -> Tensor:
    """Cross-entropy with the true labels, averaged over the rows that have one (label != ignore_index); zero if
    none do. No host synchronisation: the count stays a tensor."""
    total = F.cross_entropy(student_logits.float(), labels, ignore_index=ignore_index, reduction="sum")
    return total / (labels != ignore_index).sum().clamp_min(1)


# ----------------------------------------------------------------------------------------------------------------
# Soft-target distillation (Hinton et al. 2015): the T^2 scale and the alpha mix, each written once
# ----------------------------------------------------------------------------------------------------------------


def soft_target_term(divergence: Tensor, temperature: float) -> Tensor:
    """The soft-target term of Hinton et al. 2015 ("Distilling the Knowledge in a Neural Network"):

        kd = T^2 * D(p_T || q_T)

    The gradients of soft targets at temperature T scale as 1/T^2; the factor T^2 keeps their size independent of
    T, and comparable with the hard-label term's."""
    return divergence * temperature**2


def hinton_weights(alpha: float, terms: Iterable[str]) -> dict[str, float]:
    """The weights of Hinton et al. 2015's mix of soft and hard targets, for the terms present:

        loss = alpha * kd + (1 - alpha) * ce

    (a batch without labels has no `ce`; its `kd` keeps the weight alpha)."""
    mix = {"kd": alpha, "ce": 1.0 - alpha}
    return {name: mix[name] for name in terms}


def weighted_total(terms: Mapping[str, Tensor], weights: Mapping[str, float]) -> Tensor:
    """sum_k weights[k] * terms[k]: the loss minimised, from its named terms, in the terms' order."""
    total: Tensor | None = None
    for name, term in terms.items():  # not sum(): its start 0 is one more addition per step
        part = weights[name] * term
        total = part if total is None else total + part
    if total is None:
        raise ValueError("a loss needs at least one term")
    return total


def hinton_terms(
    student_logits: Tensor,
    teacher_logprobs: Tensor,
    labels: Tensor | None,
    *,
    temperature: float,
    token_ids: Tensor | None = None,
    teacher_temperature: float = 1.0,
    divergence: str = "forward_kl",
    beta: float = 0.5,
    kd_mask: Tensor | None = None,
    ignore_index: int = -100,
) -> dict[str, Tensor]:
    """The two named terms of soft-target distillation (Hinton et al. 2015), weighted by `hinton_weights`:

        kd = T^2 * D(p_T || q_T)      soft targets at temperature T (`soft_target_term`)
        ce = CE(y, q_1)               hard labels, only on rows that have one (a transfer set has none)

    D is forward KL by default (Hinton's soft cross-entropy up to a constant), or any divergence in LOSSES.
    """
    if divergence not in LOSSES:
        raise ValueError(f"unknown divergence {divergence!r}; choose one of {sorted(LOSSES)}")
    kd = LOSSES[divergence](
        student_logits,
        teacher_logprobs,
        token_ids=token_ids,
        temperature=temperature,
        teacher_temperature=teacher_temperature,
        mask=kd_mask,
        beta=beta,
    )
    terms = {"kd": soft_target_term(kd, temperature)}
    if labels is not None:
        terms["ce"] = hard_label_ce(student_logits, labels, ignore_index)
    return terms


def hinton_loss(
    student_logits: Tensor,
    teacher_logprobs: Tensor,
    labels: Tensor | None,
    *,
    temperature: float,
    alpha: float,
    token_ids: Tensor | None = None,
    teacher_temperature: float = 1.0,
    divergence: str = "forward_kl",
    beta: float = 0.5,
) -> Tensor:
    """alpha * kd + (1 - alpha) * ce with the terms of `hinton_terms` (`hinton_weights`)."""
    terms = hinton_terms(
        student_logits,
        teacher_logprobs,
        labels,
        temperature=temperature,
        token_ids=token_ids,
        teacher_temperature=teacher_temperature,
        divergence=divergence,
        beta=beta,
    )
    return weighted_total(terms, hinton_weights(alpha, terms))
