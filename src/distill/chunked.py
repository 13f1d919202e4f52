"""Token-level distillation losses computed in chunks over positions, so that the (tokens x vocabulary) logits of
student and teacher never exist in full at once (Liger-Kernel's fused linear distillation loss; Hsu et al. 2024).

The math is `distill.losses` (LOSSES, `hard_label_ce`), applied chunk by chunk: this module only decides what is
computed when, and keeps each chunk's gradients so that the chunk's logits can be freed.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from distill import closed_form
from distill.errors import ShapeMismatchError
from distill.losses import LOSSES, hard_label_ce

# The divergence runs on blocks of positions of at most this many (block, V) elements (16 MiB in float32): autograd's
# handful of (block, V) intermediates then stay below glibc's largest mmap threshold (32 MiB), so their memory comes
# back from the heap instead of fresh pages (each first touch a page fault), and they stay small beside the chunk's
# one (C, V) buffer. On a CPU thread this makes the divergence's element-wise work 4-5x faster than on whole
# (1024, 32000) chunks (benchmarks/lm_loss_memory.py).
BLOCK_ELEMENTS = 1 << 22


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

    The positions are taken `chunk_size` at a time: the chunk's student logits (C, V) are formed by one product
    into a buffer that every chunk reuses; then, a block of at most BLOCK_ELEMENTS (rows x V) at a time, the
    teacher's distribution is formed (its head product too, for a teacher given as hidden states), the block's term
    of the loss is computed by LOSSES with autograd on the block alone, and its logit gradient overwrites the block's
    logits in the buffer. The chunk's gradients with respect to `student_hidden`, `student_head` and `student_bias`
    (those that require grad) are then two products with the buffer; the head and bias gradients are summed over
    chunks. So at any time one (C, V) buffer (two with `labels`) and a block's few (rows, V) tensors exist, never
    the (N, V) logits; backward only scales the stored gradients by the incoming gradient. The teacher never gets
    gradients. Like LOSSES, the value has no T^2 factor (see `soft_target_term`). The memory and speed against the
    full logits are measured by benchmarks/lm_loss_memory.py.

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
    ce_per_kd: float | None = None,
) -> tuple[Tensor, Tensor]:
    """The divergence of `chunked_token_loss` and, from the same chunks (one head matmul each), the hard-label
    cross-entropy `hard_label_ce(z_s, labels)` at temperature 1 over the positions whose label is not -100 (zero
    when `labels` is None). Each term keeps its own gradients, so the caller weights them freely.

    With `ce_per_kd` = w_ce / w_kd, the caller promises to minimise w_kd kd + w_ce ce (any w_kd > 0): the two
    terms' logit gradients are then added per chunk and go through one pair of products with the head instead of
    two (benchmarks/lm_cache.py times the step); backward checks that the incoming gradients keep that ratio and
    refuses others."""
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
    if ce_per_kd is not None and not (math.isfinite(ce_per_kd) and ce_per_kd >= 0):
        raise ValueError(f"ce_per_kd must be a finite weight ratio >= 0, got {ce_per_kd}")
    kd, ce = _ChunkedTokenLoss.apply(
        student_hidden,
        student_head,
        student_bias,
        weights,
        teacher_chunk,
        divergence,
        options,
        chunk_size,
        labels,
        None if labels is None else ce_per_kd,
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
        fused: float | None,  # ce_per_kd: the ce gradients are added to the kd ones, at this weight
    ) -> tuple[Tensor, Tensor]:
        wants = tuple(ctx.needs_input_grad[:3])
        grads_kd = _Grads.zeros(student_hidden, student_head, student_bias, wants)
        separate = labels is not None and fused is None
        grads_ce = _Grads.zeros(student_hidden, student_head, student_bias, wants if separate else ())
        ce_bias = torch.zeros_like(grads_kd.bias) if fused is not None and grads_kd.bias is not None else grads_ce.bias
        # The head's products run in the dtype autocast gives a linear layer (bf16, fp16), cast once here; the
        # losses and their sums in float32 (`_block_terms`), the gradients summed in the inputs' dtypes.
        compute = _compute_dtype(student_hidden)
        student_hidden, student_head = student_hidden.to(compute), student_head.to(compute)  # (N, H), (V, H)
        student_bias = None if student_bias is None else student_bias.to(compute)  # (V,)
        n, vocab, device = student_hidden.shape[0], student_head.shape[0], student_hidden.device
        scale = _Scale(weights, labels, n)
        kd = torch.zeros((), dtype=torch.float32, device=device)
        ce = torch.zeros((), dtype=torch.float32, device=device)
        wants_grad = any(wants)
        # Two (C, V) buffers in the head's dtype, reused by every chunk: the student's logits, which the divergence's
        # logit gradients overwrite block by block, and the cross-entropy's logit gradients.
        rows_max = min(chunk_size, n)
        logits_buffer = torch.empty((rows_max, vocab), dtype=compute, device=device)  # (C, V)
        ce_buffer = torch.empty_like(logits_buffer) if labels is not None and wants_grad else None  # (C, V)
        block = block_rows(chunk_size, vocab)
        with torch.autocast(device.type, enabled=False):
            for start in range(0, n, chunk_size):
                rows = slice(start, min(start + chunk_size, n))
                hidden = student_hidden[rows]  # (C, H)
                logits = _head_product(hidden, student_head, student_bias, logits_buffer)  # (C, V)
                grad_ce = None if ce_buffer is None else ce_buffer[: rows.stop - rows.start]  # (C, V)
                for first in range(rows.start, rows.stop, block):
                    sub = slice(first, min(first + block, rows.stop))
                    local = slice(sub.start - rows.start, sub.stop - rows.start)
                    block_kd, block_ce = _block_terms(
                        logits[local], grad_ce, local, teacher_chunk, sub, scale, divergence, options,
                        None if labels is None else labels[sub], wants_grad, (grads_kd.bias, ce_bias),
                    )  # fmt: skip
                    kd += block_kd
                    ce += block_ce
                if wants_grad:  # `logits` now holds the divergence's logit gradients, `grad_ce` the cross-entropy's
                    if fused is not None and grad_ce is not None:
                        logits.add_(grad_ce, alpha=fused)  # (C, V): the gradient of kd + (w_ce / w_kd) ce
                    grads_kd.add_chunk(logits, hidden, student_head, rows)
                    if grad_ce is not None and fused is None:
                        grads_ce.add_chunk(grad_ce, hidden, student_head, rows)
        if fused is not None and ce_bias is not None and grads_kd.bias is not None:
            grads_kd.bias.add_(ce_bias, alpha=fused)
        ctx.fused = fused
        ctx.save_for_backward(*grads_kd.tensors(), *grads_ce.tensors())
        return kd, ce

    @staticmethod
    def backward(ctx: Any, grad_kd: Tensor, grad_ce: Tensor) -> tuple[Tensor | None, ...]:
        saved = ctx.saved_tensors
        if ctx.fused is not None:
            _check_fused(grad_kd, grad_ce, ctx.fused)
        grads: list[Tensor | None] = []
        for kd_part, ce_part in zip(saved[:3], saved[3:]):
            if kd_part is None:
                grads.append(None)
                continue
            grad = kd_part * grad_kd if ce_part is None else kd_part * grad_kd + ce_part * grad_ce
            grads.append(grad.to(kd_part.dtype))  # the float32 scale must not change the input's dtype
        return (*grads, None, None, None, None, None, None, None)


def _check_fused(grad_kd: Tensor, grad_ce: Tensor, ce_per_kd: float) -> None:
    """The incoming gradients of a fused call are in the promised ratio w_ce / w_kd (the stored gradients hold
    kd + ratio * ce, scaled here by the incoming kd gradient alone)."""
    expected = grad_kd * ce_per_kd
    if not bool(torch.isclose(grad_ce, expected, rtol=1e-5, atol=1e-12)):
        raise RuntimeError(
            f"chunked_kd_and_ce was called with ce_per_kd={ce_per_kd}, but the loss weighs its terms "
            f"{float(grad_kd):.6g} (kd) and {float(grad_ce):.6g} (ce): pass the weights' ratio, or no ce_per_kd"
        )


def block_rows(chunk_size: int, vocab: int) -> int:
    """Positions per block of the divergence: at most BLOCK_ELEMENTS (rows, V) elements, and at most a chunk."""
    return max(1, min(chunk_size, BLOCK_ELEMENTS // max(vocab, 1)))


@dataclass
class _Grads:
    """One term's gradients with respect to the student's hidden states (N, H), head (V, H) and bias (V,), summed
    over chunks in the inputs' dtypes; None where no gradient is wanted."""

    hidden: Tensor | None
    head: Tensor | None
    bias: Tensor | None

    @classmethod
    def zeros(cls, hidden: Tensor, head: Tensor, bias: Tensor | None, wants: tuple[bool, ...]) -> _Grads:
        wanted = [bool(w) for w in wants] + [False] * (3 - len(wants))
        return cls(
            torch.zeros_like(hidden) if wanted[0] else None,  # (N, H)
            torch.zeros_like(head) if wanted[1] else None,  # (V, H)
            torch.zeros_like(bias) if wanted[2] and bias is not None else None,  # (V,)
        )

    def tensors(self) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        return self.hidden, self.head, self.bias

    def add_chunk(self, grad: Tensor, hidden: Tensor, head: Tensor, rows: slice) -> None:
        """The chunk's gradients from those of its logits `grad` (C, V), in the head's compute dtype (that of
        `hidden` (C, H) and `head` (V, H)), added to the sums. (The bias's are added block by block, in float32.)"""
        if self.hidden is not None:
            self.hidden[rows] = grad @ head  # (C, H)
        if self.head is not None:
            if self.head.dtype == grad.dtype:
                self.head.addmm_(grad.t(), hidden)  # (V, H) += (V, C) @ (C, H)
            else:
                self.head += grad.t() @ hidden  # (V, H) in the compute dtype, summed in the head's (float32)


class _Scale:
    """What turns a block's own mean (LOSSES and `hard_label_ce` average over their rows) into its term of the mean
    over all N positions: the block's share of the total weight (of the labeled positions, for the cross-entropy)."""

    def __init__(self, weights: Tensor | None, labels: Tensor | None, n: int):
        self.weights, self.n = weights, n
        self.total = _mean_denominator(weights, n)
        self.labeled = None if labels is None else labels != -100  # (N,)
        self.total_labeled = None if self.labeled is None else _mean_denominator(self.labeled, n)

    def kd(self, rows: slice) -> tuple[Tensor | None, Tensor | float]:
        """The block's weights (C,) and its share of the divergence's total weight."""
        weights = None if self.weights is None else self.weights[rows]
        return weights, _mean_denominator(weights, rows.stop - rows.start) / self.total

    def ce(self, rows: slice) -> Tensor | float:
        """The block's share of the labeled positions."""
        assert self.labeled is not None and self.total_labeled is not None
        return _mean_denominator(self.labeled[rows], rows.stop - rows.start) / self.total_labeled


def _head_product(hidden: Tensor, head: Tensor, bias: Tensor | None, buffer: Tensor) -> Tensor:
    """hidden (C, H) @ head (V, H)^T + bias, written into the first C rows of `buffer` (C_max, V)."""
    out = buffer[: hidden.shape[0]]  # (C, V)
    if bias is None:
        return torch.mm(hidden, head.t(), out=out)
    return torch.addmm(bias, hidden, head.t(), out=out)


def _block_terms(
    logits: Tensor,  # (S, V), the block's rows of the chunk's logits buffer
    grad_ce: Tensor | None,  # (C, V), the chunk's cross-entropy gradient buffer
    local: slice,
    teacher_chunk: Callable[[slice], tuple[Tensor, Tensor | None]],
    rows: slice,
    scale: _Scale,
    divergence: str,
    options: dict[str, float],
    labels: Tensor | None,  # (S,)
    wants_grad: bool,
    bias_grads: tuple[Tensor | None, Tensor | None],
) -> tuple[Tensor, Tensor]:
    """The block `rows`'s terms of the divergence and of the cross-entropy, computed by LOSSES and `hard_label_ce`
    with autograd on the block alone. Their gradients with respect to the block's logits replace `logits` and fill
    `grad_ce[local]`; their sums over the block's rows are added to the bias gradients (kd, ce)."""
    with torch.no_grad():
        teacher, token_ids = teacher_chunk(rows)  # (S, V), or (S, K) and (S, K)
    weights, share = scale.kd(rows)
    if wants_grad and _has_closed_form(divergence, options, teacher, token_ids, logits.shape[-1]):
        # each row's factor in the total: the block's mean over its rows (weighted), times its share
        row_scale = share / _mean_denominator(weights, logits.shape[0])
        row_scale = row_scale if weights is None else weights.float() * row_scale  # (S,) or one for all rows
        return _closed_form_terms(logits, grad_ce, local, teacher, token_ids, row_scale, options["temperature"],
                                  scale, rows, labels, bias_grads)  # fmt: skip
    # float32 logits whatever the model's dtype: the log-softmax and the divergence never run in bf16 / fp16
    student_logits = logits.detach().float()  # (S, V), the buffer itself when it is float32
    with torch.enable_grad():
        student_logits.requires_grad_(wants_grad)
        term = LOSSES[divergence](student_logits, teacher, token_ids=token_ids, mask=weights, **options) * share
        ce = hard_label_ce(student_logits, labels) * scale.ce(rows) if labels is not None else term.new_zeros(())
        if not wants_grad:
            return term.detach(), ce.detach()
        (grad_kd,) = torch.autograd.grad(term, student_logits, retain_graph=labels is not None)  # (S, V)
        grad_labels = torch.autograd.grad(ce, student_logits)[0] if labels is not None else None  # (S, V)
    logits.copy_(grad_kd)  # the logits are not needed any more: the buffer carries the gradient to the products
    kd_bias, ce_bias = bias_grads
    if kd_bias is not None:
        kd_bias += grad_kd.sum(0)  # (V,)
    if grad_labels is not None and grad_ce is not None:
        grad_ce[local].copy_(grad_labels)
        if ce_bias is not None:
            ce_bias += grad_labels.sum(0)  # (V,)
    return term.detach(), ce.detach()


def _has_closed_form(
    divergence: str, options: dict[str, float], teacher: Tensor, token_ids: Tensor | None, vocab: int
) -> bool:
    """Whether `distill.closed_form` computes the block: forward KL with the teacher's log-probs at the student's
    temperature, sparse top-K or dense over the student's V classes."""
    same_temperature = options["teacher_temperature"] == options["temperature"]
    return divergence == "forward_kl" and same_temperature and (token_ids is not None or teacher.shape[-1] == vocab)


def _closed_form_terms(
    logits: Tensor,  # (S, V), the block's rows of the chunk's logits buffer
    grad_ce: Tensor | None,  # (C, V), the chunk's cross-entropy gradient buffer
    local: slice,
    teacher: Tensor,  # (S, K) top-K, or (S, V) dense
    token_ids: Tensor | None,  # (S, K), or None for a dense teacher
    row_scale: Tensor | float,  # (S,) or one factor for every row
    temperature: float,
    scale: _Scale,
    rows: slice,
    labels: Tensor | None,  # (S,)
    bias_grads: tuple[Tensor | None, Tensor | None],
) -> tuple[Tensor, Tensor]:
    """`_block_terms` for forward KL against a sparse teacher (a cache) or a dense one (a live teacher), with the
    gradients in closed form (`distill.closed_form`): the same values and gradients with a few passes over the
    block's logits and no saved autograd tensors."""
    exact = logits if logits.dtype == torch.float32 else logits.float()  # (S, V)
    ce = exact.new_zeros(())
    kd_bias, ce_bias = bias_grads
    if labels is not None and grad_ce is not None:  # first: the divergence overwrites the logits
        labeled = (labels != -100).sum().clamp_min(1)
        ce_rows = scale.ce(rows) / labeled
        ce = closed_form.cross_entropy_grad(exact, labels, grad_ce[local], ce_rows)
        if ce_bias is not None:
            ce_bias += grad_ce[local].sum(0, dtype=torch.float32)  # (V,)
    row_scale = torch.as_tensor(row_scale, dtype=torch.float32, device=logits.device).expand(logits.shape[0])
    if token_ids is None:
        kd = closed_form.dense_forward_kl_grad(exact, teacher, row_scale, temperature)
    else:
        kd = closed_form.sparse_forward_kl_grad(exact, teacher, token_ids, row_scale, temperature)
    if exact is not logits:
        logits.copy_(exact)
    if kd_bias is not None:
        kd_bias += exact.sum(0)  # (V,)
    return kd, ce


def _compute_dtype(hidden: Tensor) -> torch.dtype:
    """The dtype of the head's products: autocast's when the caller runs under it, else the hidden states'."""
    device = hidden.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
