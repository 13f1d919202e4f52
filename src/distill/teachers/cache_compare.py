"""How far apart two token caches of the same data are: KL(reference || other) at every position, for checking a
cache built one way (through a server, `served_cache`) against one built another (the local build).

A cache holds, at each position, K ids with their log-probs and the mass of the rest (the tail bucket). Each cache is
read as a distribution over the whole vocabulary by spreading its tail evenly over the ids it leaves out; the KL of
two such distributions is exact over the buckets they define: the ids either keeps, and the ids both leave out
(where both are uniform). With the same ids on both sides it is the KL over the K + 1 buckets the loss sees.
"""

from __future__ import annotations

import numpy as np

from distill.teachers.protocol import TeacherOutput
from distill.teachers.token_cache import TokenCache


def cache_kl(reference: TokenCache, other: TokenCache, rows_at_once: int = 64) -> np.ndarray:
    """KL(reference || other) (n,) at every position of two caches of the same data (a served build against the
    local one), each cache's distribution being its top-K entries and its tail spread evenly over the other ids of
    the vocabulary; ValueError when the caches are not of the same sequences, positions and vocabulary."""
    if not np.array_equal(reference.lengths, other.lengths) or reference.num_classes != other.num_classes:
        raise ValueError("the caches are not of the same sequences and vocabulary")
    out = [np.zeros(0)]
    for first in range(0, len(reference), rows_at_once):
        rows = np.arange(first, min(first + rows_at_once, len(reference)))
        width = int(reference.lengths[rows].max())
        p_lp, p_ids, mask = _arrays(reference.batch(rows, width))
        q_lp, q_ids, q_mask = _arrays(other.batch(rows, width))
        if not np.array_equal(mask, q_mask):
            raise ValueError(f"the caches hold other positions of sequences {rows[0]}..{rows[-1]}")
        out.append(_kl(p_lp[mask], p_ids[mask], q_lp[mask], q_ids[mask], reference.num_classes))
    return np.concatenate(out)


def _arrays(output: TeacherOutput) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A cache batch's log-probs (B, T, K) float64, ids (B, T, K) and scored mask (B, T)."""
    assert output.logprobs is not None and output.token_ids is not None and output.mask is not None
    return output.logprobs.numpy().astype(np.float64), output.token_ids.numpy(), output.mask.numpy()


def _kl(p_lp: np.ndarray, p_ids: np.ndarray, q_lp: np.ndarray, q_ids: np.ndarray, vocab: int) -> np.ndarray:
    """KL(p || q) (n,) of top-K log-probs (n, Kp), (n, Kq) and their ids, each tail spread over the ids left out."""
    p_rest = _log_each_left(p_lp, vocab)  # (n,)
    q_rest = _log_each_left(q_lp, vocab)  # (n,)
    same = p_ids[:, :, None] == q_ids[:, None, :]  # (n, Kp, Kq)
    q_at_p = np.where(same.any(2), (q_lp[:, None, :] * same).sum(2), q_rest[:, None])  # (n, Kp)
    kl = (np.exp(p_lp) * (p_lp - q_at_p)).sum(1)  # (n,) over p's top-K
    only_q = ~same.any(1)  # (n, Kq) q's entries among p's tail
    kl += (only_q * np.exp(p_rest)[:, None] * (p_rest[:, None] - q_lp)).sum(1)
    neither = vocab - p_lp.shape[1] - only_q.sum(1)  # (n,) ids in both tails
    return kl + neither * np.exp(p_rest) * (p_rest - q_rest)


def _log_each_left(top: np.ndarray, vocab: int) -> np.ndarray:
    """(n,) the log-prob of each id outside a top-K (n, K): the tail mass spread evenly over the V - K of them."""
    tail = np.clip(1.0 - np.exp(top).sum(1), 1e-30, None)  # (n,)
    return np.log(tail) - np.log(max(vocab - top.shape[1], 1))
