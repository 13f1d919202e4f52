"""Forward KL against a sparse (top-K) or dense teacher and the hard-label cross-entropy, with their logit gradients
in closed form: what the chunked LM loss (`distill.chunked`) computes for a cached or live teacher, the common cases,
without autograd's passes (and its saved (S, V) tensors) over a block.

The values are those of `distill.losses.forward_kl` on sparse buckets and `distill.losses.hard_label_ce`; only the
gradients are written out. With q = softmax(z / T) the student's distribution, the buckets b are the teacher's K
valid ids (one class each) and the tail (every other class), Q_b = sum_{j in b} q_j, and t_b the teacher's bucket
probabilities (its tail 1 - sum of its top K, or 0 within TAIL_EPS), with s = sum_b t_b:

    KL = sum_b t_b (log t_b - log Q_b),     d log Q_b / d z_j = ([j in b] q_j / Q_b - q_j) / T

    d KL / d z_j = (q_j s - t_j) / T                 for j one of the teacher's ids
                 = q_j (s - t_tail / Q_tail) / T      for j in the tail

that is (s - r) q plus a correction at the K ids, r = t_tail / Q_tail: one scaled copy of q and a scatter of K
values per row. The cross-entropy's gradient is softmax(z) - onehot(y). On a (131, 32000) block this replaces some
fifteen passes of autograd by about six (benchmarks/lm_cache.py measures the step).

Against a dense teacher p over all V classes (a live teacher's log_softmax at T), with P = sum_j p_j (1 but for
rounding):

    KL = sum_j p_j (log p_j - log q_j),     d KL / d z_j = (P q_j - p_j) / T

Log-probabilities are floored at LOG_FLOOR in the value, as in `distill.losses`; the gradient is the exact one
(autograd through the floor gives zero at a bucket below e^-100, where the difference is below float32's reach).
"""

from __future__ import annotations

import torch
from torch import Tensor

from distill.losses import LOG_FLOOR, TAIL_EPS, check_same_shape, checked_ids


def sparse_forward_kl_grad(
    logits: Tensor,  # (S, V) float32, the student's logits (overwritten with the gradient)
    teacher_logprobs: Tensor,  # (S, K), the teacher's top-K log-probs at T
    token_ids: Tensor,  # (S, K), their ids (-1: an empty entry)
    row_scale: Tensor,  # (S,), each row's factor in the total (its weight over the total weight, times the share)
    temperature: float,
) -> Tensor:
    """sum_i row_scale_i KL_i(teacher || student) over the block's rows (a float32 scalar), with its gradient with
    respect to the logits written into `logits` in place (no other (S, V) tensor is allocated at T = 1)."""
    ids = checked_ids(logits, teacher_logprobs, token_ids)  # (S, K)
    empty = ids < 0  # (S, K)
    safe = ids.clamp_min(0)  # (S, K)
    scaled = logits if temperature == 1.0 else logits.div_(temperature)  # (S, V), z / T
    lse = torch.logsumexp(scaled, dim=-1, keepdim=True)  # (S, 1)
    q = scaled.sub_(lse).exp_()  # (S, V): the student's probabilities, in place of the logits
    q_top = q.gather(-1, safe).masked_fill(empty, 0.0)  # (S, K)
    # The tail's mass summed over the tail's own classes (the ids' entries zeroed first; they are written over at
    # the end), so a tail of 1e-13 keeps its digits, which 1 - sum(q_top) would lose to rounding.
    q.scatter_(-1, *_without_empty(ids, empty, torch.zeros_like(q_top), q))
    q_tail = q.sum(-1)  # (S,)

    t_top_log = teacher_logprobs.float().masked_fill(empty, LOG_FLOOR).clamp_min(LOG_FLOOR)  # (S, K)
    t_top = t_top_log.exp().masked_fill(empty, 0.0)  # (S, K)
    t_tail = 1.0 - t_top.sum(-1)  # (S,)
    t_tail = torch.where(t_tail > TAIL_EPS, t_tail, torch.zeros_like(t_tail))

    q_top_log = q_top.log().clamp_min(LOG_FLOOR).masked_fill(empty, LOG_FLOOR)  # (S, K)
    t_tail_log = t_tail.log().clamp_min(LOG_FLOOR)  # (S,)
    q_tail_log = q_tail.log().clamp_min(LOG_FLOOR)  # (S,)
    # F.kl_div's terms exp(t) (t - s), the floored empty entries and teacher tails included, as in the reference
    rows = (t_top_log.exp() * (t_top_log - q_top_log)).sum(-1) + t_tail_log.exp() * (t_tail_log - q_tail_log)  # (S,)
    value = (rows * row_scale).sum()

    total = t_top.sum(-1) + t_tail  # (S,), s
    ratio = torch.where(q_tail > 0, t_tail / q_tail.clamp_min(torch.finfo(torch.float32).tiny), 0.0)  # (S,), r
    factor = row_scale / temperature  # (S,)
    q.mul_(((total - ratio) * factor).unsqueeze(-1))  # (S, V): (s - r) q / T, each row scaled: the tail's
    top = (total.unsqueeze(-1) * q_top - t_top) * factor.unsqueeze(-1)  # (S, K): the ids', written over (s - r) q
    targets, values = _without_empty(ids, empty, top, q)
    q.scatter_(-1, targets, values)
    return value


def dense_forward_kl_grad(
    logits: Tensor,  # (S, V) float32, the student's logits (overwritten with the gradient)
    teacher_logprobs: Tensor,  # (S, V), the teacher's normalised log-probs at T
    row_scale: Tensor,  # (S,), each row's factor in the total
    temperature: float,
) -> Tensor:
    """sum_i row_scale_i KL_i(teacher || student) over the block's rows (a float32 scalar), with its gradient with
    respect to the logits written into `logits` in place (one other (S, V) tensor: the teacher's probabilities)."""
    check_same_shape(logits, teacher_logprobs)
    scaled = logits if temperature == 1.0 else logits.div_(temperature)  # (S, V), z / T
    lse = torch.logsumexp(scaled, dim=-1)  # (S,)
    log_p = teacher_logprobs.float()  # (S, V)
    p = log_p.exp()  # (S, V)
    mass = p.sum(-1)  # (S,), P
    # sum_j p_j (log p_j - z_j / T + lse) as row-wise dot products, which allocate no (S, V) tensor
    rows = _row_dot(p, log_p) - _row_dot(p, scaled) + lse * mass  # (S,)
    value = (rows * row_scale).sum()
    factor = (row_scale / temperature).unsqueeze(-1)  # (S, 1)
    q = scaled.sub_(lse.unsqueeze(-1)).exp_()  # (S, V): the student's probabilities, in place of the logits
    q.mul_(mass.unsqueeze(-1) * factor).sub_(p.mul_(factor))  # (S, V): (P q - p) / T, each row scaled
    return value


def _row_dot(a: Tensor, b: Tensor) -> Tensor:
    """sum_j a_ij b_ij per row, by a batched product (no (S, V) temporary). (S, V), (S, V) -> (S,)"""
    return torch.bmm(a.unsqueeze(1), b.unsqueeze(2)).view(-1)


def _without_empty(ids: Tensor, empty: Tensor, top: Tensor, grad: Tensor) -> tuple[Tensor, Tensor]:
    """Where to write the ids' gradients `top` (S, K) into `grad` (S, V), and what: an empty entry (-1) repeats its
    row's first valid id and value (class 0 and its current value in a row without one), so that it changes nothing
    and no class gets two different values. (Written over, not added to, the tail's (s - r) q: for a student tail of
    1e-13 r is 1e12, and adding r q_j back would cancel away the float32 digits of s q_j.)"""
    valid = ~empty  # (S, K)
    has_valid = valid.any(-1)  # (S,)
    first = valid.to(torch.int8).argmax(-1, keepdim=True)  # (S, 1): the first valid entry (0 in a row without one)
    fallback_id = torch.where(has_valid.unsqueeze(-1), ids.gather(-1, first), 0)  # (S, 1)
    fallback_value = torch.where(has_valid.unsqueeze(-1), top.gather(-1, first), grad[:, :1])  # (S, 1)
    targets = torch.where(empty, fallback_id, ids)  # (S, K)
    values = torch.where(empty, fallback_value, top)  # (S, K)
    return targets, values


def cross_entropy_grad(
    logits: Tensor,  # (S, V) float32, the student's logits (read only)
    labels: Tensor,  # (S,), -100 where a row has no label
    grad: Tensor,  # (S, V), where the gradient is written (any float dtype)
    row_scale: float | Tensor,  # each labeled row's factor in the total
) -> Tensor:
    """sum over labeled rows of row_scale * (log-sum-exp(z) - z_y) (a float32 scalar), with its gradient
    row_scale (softmax(z) - onehot(y)) written into `grad` (zero on unlabeled rows)."""
    labeled = labels != -100  # (S,)
    safe = labels.clamp_min(0).unsqueeze(-1)  # (S, 1)
    lse = torch.logsumexp(logits, dim=-1, keepdim=True)  # (S, 1)
    scale = labeled.float() * row_scale  # (S,)
    value = ((lse.squeeze(-1) - logits.gather(-1, safe).squeeze(-1)) * scale).sum()
    if grad.dtype == torch.float32:
        torch.sub(logits, lse, out=grad).exp_().mul_(scale.unsqueeze(-1))  # (S, V)
    else:
        grad.copy_((logits - lse).exp_().mul_(scale.unsqueeze(-1)))
    grad.scatter_add_(-1, safe, (-scale).unsqueeze(-1).to(grad.dtype))
    return value
