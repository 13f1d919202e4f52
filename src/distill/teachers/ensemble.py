"""Several teachers averaged into one distribution (Hinton et al. 2015: distilling an ensemble into one model)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

from distill.errors import DistillError, ShapeMismatchError
from distill.teachers import Teacher, TeacherOutput


class EnsembleTeacher:
    """Combines the members' dense distributions with weights w (normalised to sum to 1):

    mean:       p(y) = sum_i w_i p_i(y)                              (arithmetic mean of probabilities)
    geometric:  p(y) proportional to prod_i p_i(y)^{w_i}             (mean of log-probs, renormalised)
    """

    def __init__(
        self,
        members: Sequence[Teacher],
        weights: Sequence[float] | None = None,
        mode: Literal["mean", "geometric"] = "mean",
    ):
        if not members:
            raise DistillError("an ensemble needs at least one teacher")
        widths = {m.num_classes for m in members}
        if len(widths) != 1:
            raise ShapeMismatchError(f"ensemble members disagree on the number of classes: {sorted(widths)}")
        if weights is None:
            weights = [1.0] * len(members)
        if len(weights) != len(members):
            raise DistillError(f"{len(weights)} ensemble weights for {len(members)} teachers")
        if any(w < 0 or not math.isfinite(w) for w in weights) or sum(weights) <= 0:
            raise DistillError(f"ensemble weights must be non-negative and not all zero, got {list(weights)}")
        total = float(sum(weights))
        self.members = list(members)
        self.weights = [float(w) / total for w in weights]
        self.mode = mode
        self.num_classes = widths.pop()

    def __call__(self, batch: dict[str, Tensor]) -> TeacherOutput:
        outputs = [member(batch) for member in self.members]
        if any(o.sparse or o.logprobs is None for o in outputs):
            raise DistillError("an ensemble combines dense teachers only; a sparse (top-k) member cannot be averaged")
        logprobs = torch.stack(
            [torch.log_softmax(o.logprobs.float() * o.temperature, dim=-1) for o in outputs if o.logprobs is not None]
        )  # (M, B, C), each at temperature 1
        shape = (-1,) + (1,) * (logprobs.dim() - 1)
        weights = torch.tensor(self.weights, dtype=logprobs.dtype, device=logprobs.device).view(shape)  # (M, 1, 1)
        if self.mode == "mean":
            combined = torch.logsumexp(logprobs + weights.clamp_min(1e-30).log(), dim=0)  # (B, C)
        else:
            combined = torch.log_softmax((logprobs * weights).sum(0), dim=-1)  # (B, C)
        return TeacherOutput(logprobs=combined)
