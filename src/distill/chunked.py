"""Token-level distillation losses computed in chunks over positions, so that the (tokens x vocabulary) logits of
student and teacher never exist in full at once (Liger-Kernel's fused linear distillation loss; Hsu et al. 2024).

The math is `distill.losses` (LOSSES, `hard_label_ce`), applied chunk by chunk: this module only decides what is
computed when, and keeps each chunk's gradients so that the chunk's logits can be freed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from distill.errors import ShapeMismatchError
from distill.losses import LOSSES, hard_label_ce


def chunked_token_loss(
    student_hidden: Tensor,
    student_head: Tensor,
    *,
    student_bias: Tensor | None = None,
    teacher_hidden: Tensor | None = None,
    teacher_head: Tensor | None = None,
    teacher_bias: Tensor | None = None,
    teacher_logprobs: Tensor | None = None,
    token_ids: Tensor | None = None,
    divergence: str = "forward_kl",
    temperature: float = 1.0,
    teacher_temperature: float = 1.0,
    beta: float = 0.5,
    weights: Tensor | None = None,
    chunk_size: int = 1024,
    labels: Tensor | None = None,
) -> Tensor:
    """LOSSES[divergence] between student and teacher next-token distributions at N positions, computed without the
    (N, V) logits of both models ever existing at once (Liger-Kernel's fused linear distillation loss; Hsu et al.
    2024, "Liger Kernel: Efficient Triton Kernels for LLM Training"):

        z_s  = student_hidden @ student_head^T + student_bias                          (N, V)
        p    = softmax(teacher_hidden @ teacher_head^T + teacher_bias), or the given teacher log-probs
        loss = sum_i w_i D(p_i || q_i) / max(sum_i w_i, 1)       (the plain mean over N when weights is None)

    where D is any divergence of LOSSES at temperature T (forward KL, reverse KL, the generalised JSD_beta of GKD,
    Agarwal et al. 2024, TVD, ULD of Boizard et al. 2024), so the value equals LOSSES[divergence](z_s, teacher,
    mask=weights, ...) on the full logits. The teacher is dense hidden states + head (raw logits, so
    `teacher_temperature` must stay 1), or dense (N, V) log-probs at `teacher_temperature`, or sparse top-K (N, K)
    log-probs at T with their `token_ids`. For "uld" the teacher may have another vocabulary: a head (V_t, H_t), or
    (N, K) log-probs of any width without ids.

    The positions are taken `chunk_size` at a time: the chunk's student logits and teacher distribution are formed,
    its term of the loss is computed by LOSSES, and its gradient with respect to `student_hidden`, `student_head`
    and `student_bias` (those that require grad) is taken at once; the head and bias gradients are summed over
    chunks. Backward only scales these stored gradients by the incoming gradient. The teacher never gets gradients.
    Like LOSSES, the value has no T^2 factor (see `soft_target_term`). At N = 4096, V = 32000 the default chunk cuts the
    peak memory of forward + backward by 73 % against the full logits (benchmarks/lm_loss_memory.py).

    See `chunked_kd_and_ce` for the divergence and the hard-label cross-entropy from one pass over the chunks.
    """
    kd, _ = chunked_kd_and_ce(
        student_hidden, student_head, student_bias=student_bias, teacher_hidden=teacher_hidden,
        teacher_head=teacher_head, teacher_bias=teacher_bias, teacher_logprobs=teacher_logprobs, token_ids=token_ids,
        divergence=divergence, temperature=temperature, teacher_temperature=teacher_temperature, beta=beta,
        weights=weights, chunk_size=chunk_size, labels=labels,
    )  # fmt: skip
    return kd


def chunked_kd_and_ce(
    student_hidden: Tensor,
    student_head: Tensor,
    *,
    student_bias: Tensor | None = None,
    teacher_hidden: Tensor | None = None,
    teacher_head: Tensor | None = None,
    teacher_bias: Tensor | None = None,
    teacher_logprobs: Tensor | None = None,
    token_ids: Tensor | None = None,
    divergence: str = "forward_kl",
    temperature: float = 1.0,
    teacher_temperature: float = 1.0,
    beta: float = 0.5,
    weights: Tensor | None = None,
    chunk_size: int = 1024,
    labels: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """The divergence of `chunked_token_loss` and, from the same chunks (one head matmul each), the hard-label
    cross-entropy `hard_label_ce(z_s, labels)` at temperature 1 over the positions whose label is not -100 (zero
    when `labels` is None). Each term keeps its own gradients, so the caller weights them freely."""
    if divergence not in LOSSES:
        raise ValueError(f"unknown divergence {divergence!r}; choose one of {sorted(LOSSES)}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be at least 1, got {chunk_size}")
    if (teacher_logprobs is None) == (teacher_hidden is None or teacher_head is None):
        raise ValueError("give the teacher either as teacher_hidden and teacher_head, or as teacher_logprobs")
    if token_ids is not None and teacher_logprobs is None:
        raise ValueError("token_ids go with sparse teacher_logprobs, not with a teacher given as hidden states")
    if teacher_hidden is not None and teacher_temperature != 1.0:
        raise ValueError("teacher_temperature describes given teacher_logprobs; a teacher head yields raw logits")
    n, vocab = _check_chunked_shapes(student_hidden, student_head, student_bias, weights, "student")
    teacher_vocab = None if divergence == "uld" else vocab  # ULD compares sorted distributions: any teacher width
    _check_teacher_shapes(n, teacher_vocab, teacher_hidden, teacher_head, teacher_bias, teacher_logprobs, token_ids)

    def teacher_chunk(rows: slice) -> tuple[Tensor, Tensor | None]:
        """The teacher's log-probs for a chunk of positions (and its top-K ids when sparse)."""
        if teacher_logprobs is not None:
            return teacher_logprobs[rows], None if token_ids is None else token_ids[rows]
        assert teacher_hidden is not None and teacher_head is not None
        logits = F.linear(teacher_hidden[rows], teacher_head, teacher_bias).float()  # (C, V_t), V_t = V but for uld
        return F.log_softmax(logits if temperature == 1.0 else logits / temperature, dim=-1), None  # (C, V_t) at T

    options = {
        "temperature": temperature,
        # The head's log-probs above are already at T; given log-probs are at teacher_temperature.
        "teacher_temperature": temperature if teacher_logprobs is None else teacher_temperature,
        "beta": beta,
    }
    if labels is not None and tuple(labels.shape) != (n,):
        raise ShapeMismatchError(f"labels have shape {tuple(labels.shape)}, expected one per position ({n},)")
    kd, ce = _ChunkedTokenLoss.apply(
        student_hidden, student_head, student_bias, weights, teacher_chunk, divergence, options, chunk_size, labels
    )
    return kd, ce


def _check_teacher_shapes(
    n: int,
    vocab: int | None,
    teacher_hidden: Tensor | None,
    teacher_head: Tensor | None,
    teacher_bias: Tensor | None,
    teacher_logprobs: Tensor | None,
    token_ids: Tensor | None,
) -> None:
    """The teacher, as hidden states (N, H) + head (V, H) or as log-probs (N, V) / top-K (N, K), fits the student's
    N positions and V classes (any number of classes when `vocab` is None: the teacher of `uld`)."""
    if teacher_hidden is not None and teacher_head is not None:
        classes = teacher_head.shape[0] if vocab is None else vocab
        if (teacher_hidden.shape[0], teacher_head.shape[0]) != (n, classes):
            student = f"{n} positions" + ("" if vocab is None else f" and {vocab} classes")
            raise ShapeMismatchError(
                f"student has {student}, teacher has {teacher_hidden.shape[0]} positions "
                f"and {teacher_head.shape[0]} classes"
            )
        _check_chunked_shapes(teacher_hidden, teacher_head, teacher_bias, None, "teacher")
    elif teacher_logprobs is not None:
        expected = (n, vocab) if token_ids is None and vocab is not None else (n, teacher_logprobs.shape[-1])
        if tuple(teacher_logprobs.shape) != expected:
            raise ShapeMismatchError(
                f"teacher log-probs have shape {tuple(teacher_logprobs.shape)} but the student has {n} positions "
                f"and {vocab} classes" + ("" if token_ids is None else " (sparse: (N, K) expected)")
            )


def _check_chunked_shapes(
    hidden: Tensor, head: Tensor, bias: Tensor | None, weights: Tensor | None, who: str
) -> tuple[int, int]:
    """(N, V) of one model's hidden states (N, H) and head (V, H), after checking them, its bias and the weights."""
    if hidden.dim() != 2 or head.dim() != 2 or hidden.shape[1] != head.shape[1]:
        raise ShapeMismatchError(
            f"{who} hidden states {tuple(hidden.shape)} and head {tuple(head.shape)} must be (N, H) and (V, H)"
        )
    n, vocab = hidden.shape[0], head.shape[0]
    if bias is not None and tuple(bias.shape) != (vocab,):
        raise ShapeMismatchError(f"{who} bias has shape {tuple(bias.shape)}, expected ({vocab},)")
    if weights is not None and tuple(weights.shape) != (n,):
        raise ShapeMismatchError(f"weights have shape {tuple(weights.shape)}, expected one per position ({n},)")
    return n, vocab


def _mean_denominator(mask: Tensor | None, rows: int) -> Tensor | float:
    """What `_mean` divides by: the number of rows, or the mask's total (at least 1)."""
    return float(rows) if mask is None else mask.to(torch.float32).sum().clamp_min(1.0)


class _ChunkedTokenLoss(torch.autograd.Function):
    """Forward computes both terms and the student's gradients of each, chunk by chunk; backward combines the stored
    gradients with the incoming ones."""

    @staticmethod
    def forward(
        ctx: Any,
        student_hidden: Tensor,  # (N, H)
        student_head: Tensor,  # (V, H)
        student_bias: Tensor | None,  # (V,)
        weights: Tensor | None,  # (N,)
        teacher_chunk: Callable[[slice], tuple[Tensor, Tensor | None]],
        divergence: str,
        options: dict[str, float],
        chunk_size: int,
        labels: Tensor | None,  # (N,)
    ) -> tuple[Tensor, Tensor]:
        wants_hidden, wants_head, wants_bias = ctx.needs_input_grad[:3]

        def zeros() -> list[Tensor | None]:
            return [
                torch.zeros_like(student_hidden) if wants_hidden else None,  # (N, H)
                torch.zeros_like(student_head) if wants_head else None,  # (V, H)
                torch.zeros_like(student_bias) if wants_bias and student_bias is not None else None,  # (V,)
            ]

        grads_kd = zeros()
        grads_ce: list[Tensor | None] = zeros() if labels is not None else [None, None, None]
        # The head's products run in the dtype autocast gives a linear layer (bf16, fp16), cast once here; the
        # losses and their sums in float32 (`_chunk_term`), the gradients summed in the inputs' dtypes.
        compute = _compute_dtype(student_hidden)
        student_hidden, student_head = student_hidden.to(compute), student_head.to(compute)  # (N, H), (V, H)
        student_bias = None if student_bias is None else student_bias.to(compute)  # (V,)
        n = student_hidden.shape[0]
        total = _mean_denominator(weights, n)
        labeled = None if labels is None else (labels != -100)
        total_labeled = None if labeled is None else _mean_denominator(labeled, n)
        kd = torch.zeros((), dtype=torch.float32, device=student_hidden.device)
        ce = torch.zeros((), dtype=torch.float32, device=student_hidden.device)
        for start in range(0, n, chunk_size):
            rows = slice(start, min(start + chunk_size, n))
            # LOSSES gives the chunk's own (weighted) mean; times the chunk's share of the total weight it becomes
            # the chunk's term of the full mean.
            chunk_weights = None if weights is None else weights[rows]
            share = _mean_denominator(chunk_weights, rows.stop - rows.start) / total
            ce_share = None
            if labeled is not None and total_labeled is not None:
                ce_share = _mean_denominator(labeled[rows], rows.stop - rows.start) / total_labeled
            chunk_kd, chunk_ce = _chunk_term(
                student_hidden, student_head, student_bias, teacher_chunk, rows, chunk_weights, share, grads_kd,
                divergence, options, None if labels is None else labels[rows], ce_share, grads_ce,
            )  # fmt: skip
            kd += chunk_kd
            ce += chunk_ce
        ctx.save_for_backward(*grads_kd, *grads_ce)
        return kd, ce

    @staticmethod
    def backward(ctx: Any, grad_kd: Tensor, grad_ce: Tensor) -> tuple[Tensor | None, ...]:
        saved = ctx.saved_tensors
        grads: list[Tensor | None] = []
        for kd_part, ce_part in zip(saved[:3], saved[3:]):
            if kd_part is None:
                grads.append(None)
                continue
            grad = kd_part * grad_kd if ce_part is None else kd_part * grad_kd + ce_part * grad_ce
            grads.append(grad.to(kd_part.dtype))  # the float32 scale must not change the input's dtype
        return (*grads, None, None, None, None, None, None)


def _chunk_term(
    student_hidden: Tensor,  # (N, H)
    head: Tensor,  # (V, H)
    bias: Tensor | None,  # (V,)
    teacher_chunk: Callable[[slice], tuple[Tensor, Tensor | None]],
    rows: slice,
    weights: Tensor | None,  # (C,)
    share: Tensor | float,
    grads: list[Tensor | None],
    divergence: str,
    options: dict[str, float],
    labels: Tensor | None = None,  # (C,)
    ce_share: Tensor | float | None = None,
    ce_grads: list[Tensor | None] | None = None,
) -> tuple[Tensor, Tensor]:
    """The chunk `rows`'s terms of the divergence and of the cross-entropy; adds their gradients to `grads` and
    `ce_grads` (hidden rows, head, bias). Its (C, V) tensors are freed on return, before the next chunk's."""
    wants_grad = any(g is not None for g in grads)
    hidden = student_hidden[rows]  # (C, H)
    with torch.no_grad():
        teacher, token_ids = teacher_chunk(rows)  # (C, V), or (C, K) and (C, K)
    device = hidden.device
    zero = torch.zeros((), dtype=torch.float32, device=device)
    with torch.autocast(device.type, enabled=False):
        # float32 logits whatever the model's dtype: the log-softmax and the divergence never run in bf16 / fp16
        student_logits = F.linear(hidden, head, bias).float()  # (C, V)
        with torch.enable_grad():
            student_logits.requires_grad_(wants_grad)
            term = LOSSES[divergence](student_logits, teacher, token_ids=token_ids, mask=weights, **options) * share
            with_ce = labels is not None and ce_share is not None
            ce = (
                hard_label_ce(student_logits, labels) * ce_share
                if labels is not None and ce_share is not None
                else zero
            )
            if not wants_grad:
                return term.detach(), ce.detach()
            (grad_logits,) = torch.autograd.grad(term, student_logits, retain_graph=with_ce)  # (C, V)
            grad_ce = torch.autograd.grad(ce, student_logits)[0] if with_ce and ce.requires_grad else None  # (C, V)
        _add_chunk_grads(grads, grad_logits, hidden, head, rows)
        if grad_ce is not None and ce_grads is not None:
            _add_chunk_grads(ce_grads, grad_ce, hidden, head, rows)
    return term.detach(), ce.detach()


def _add_chunk_grads(
    grads: list[Tensor | None], grad_logits: Tensor, hidden: Tensor, head: Tensor, rows: slice
) -> None:
    """The chunk's gradients from those of its float32 logits (C, V): products in the head's compute dtype (that
    of `hidden` (C, H) and `head` (V, H)), added to the sums kept in the inputs' dtypes."""
    grad_hidden, grad_head, grad_bias = grads
    grad = grad_logits.to(head.dtype)  # (C, V)
    if grad_hidden is not None:
        grad_hidden[rows] = grad @ head  # (C, H)
    if grad_head is not None:
        if grad_head.dtype == grad.dtype:
            grad_head.addmm_(grad.t(), hidden)  # (V, H) += (V, C) @ (C, H)
        else:
            grad_head += grad.t() @ hidden  # (V, H) in the compute dtype, summed in the head's (float32)
    if grad_bias is not None:
        grad_bias += grad_logits.sum(0)  # (V,) float32


def _compute_dtype(hidden: Tensor) -> torch.dtype:
    """The dtype of the head's products: autocast's when the caller runs under it, else the hidden states'."""
    device = hidden.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
