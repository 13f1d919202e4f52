"""Several teachers combined into one distribution (Hinton et al. 2015: distilling an ensemble into one model).

`combine` is the one place members' distributions are combined: the `EnsembleTeacher` that teaches a student and
the service's cascade that escalates to that teacher both call it, so the cascade answers with the very
distribution the student was distilled from.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

from distill.errors import DistillError, ShapeMismatchError
from distill.teachers.protocol import Teacher, TeacherOutput

Mode = Literal["mean", "geometric"]
MODES: tuple[Mode, ...] = ("mean", "geometric")


def normalised_weights(weights: Sequence[float] | None, members: int) -> list[float]:
    """One weight per member, normalised to sum to 1 (equal weights when None)."""
    if weights is None:
        weights = [1.0] * members
    if len(weights) != members:
        raise DistillError(f"{len(weights)} ensemble weights for {members} teachers")
    if any(w < 0 or not math.isfinite(w) for w in weights) or sum(weights) <= 0:
        raise DistillError(f"ensemble weights must be non-negative and not all zero, got {list(weights)}")
    total = float(sum(weights))
    return [float(w) / total for w in weights]


def combine(logprobs: Tensor, mode: Mode = "mean", weights: Sequence[float] | None = None) -> Tensor:
    """The members' log-probabilities (M, ..., C), each normalised at temperature 1, combined into one (..., C)
    with weights w (normalised to sum to 1; equal when None):

    mean:       p(y) = sum_i w_i p_i(y)                              (arithmetic mean of probabilities)
    geometric:  p(y) proportional to prod_i p_i(y)^{w_i}             (weighted mean of log-probs, renormalised)
    """
    if mode not in MODES:
        raise DistillError(f"unknown ensemble mode {mode!r}; choose one of {list(MODES)}")
    shares = normalised_weights(weights, logprobs.shape[0])
    shape = (-1,) + (1,) * (logprobs.dim() - 1)
    w = torch.tensor(shares, dtype=logprobs.dtype, device=logprobs.device).view(shape)  # (M, 1, ..., 1)
    if mode == "mean":
        return torch.logsumexp(logprobs + w.clamp_min(1e-30).log(), dim=0)  # (..., C)
    return torch.log_softmax((logprobs * w).sum(0), dim=-1)  # (..., C)


class EnsembleTeacher:
    """The members' dense distributions combined by `combine` (`mode` "mean" or "geometric", with `weights`)."""

    def __init__(self, members: Sequence[Teacher], weights: Sequence[float] | None = None, mode: Mode = "mean"):
        if not members:
            raise DistillError("an ensemble needs at least one teacher")
        widths = {m.num_classes for m in members}
        if len(widths) != 1:
            raise ShapeMismatchError(f"ensemble members disagree on the number of classes: {sorted(widths)}")
        if mode not in MODES:
            raise DistillError(f"unknown ensemble mode {mode!r}; choose one of {list(MODES)}")
        self.members = list(members)
        self.weights = normalised_weights(weights, len(members))
        self.mode = mode
        self.num_classes = widths.pop()

    def __call__(self, batch: dict[str, Tensor]) -> TeacherOutput:
        outputs = [member(batch) for member in self.members]
        if any(o.sparse or o.logprobs is None for o in outputs):
            raise DistillError("an ensemble combines dense teachers only; a sparse (top-k) member cannot be averaged")
        logprobs = torch.stack(
            [torch.log_softmax(o.logprobs.float() * o.temperature, dim=-1) for o in outputs if o.logprobs is not None]
        )  # (M, B, C), each at temperature 1
        return TeacherOutput(logprobs=combine(logprobs, self.mode, self.weights))
