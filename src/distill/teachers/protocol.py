"""What every teacher is: a callable from a batch to a `TeacherOutput` (the `Teacher` protocol)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from torch import Tensor


@dataclass
class TeacherOutput:
    """What a teacher says about a batch.

    logprobs:      dense (..., V) log-probabilities, or the top-K (..., K) when `token_ids` is given; None for a
                   teacher that only provides features (an encoder without a head)
    token_ids:     (..., K) class / token ids of a sparse teacher; None when dense
    hidden_states: captured outputs of named modules, for feature distillation ({module name: tensor})
    temperature:   the temperature the log-probs were computed at (1.0 for a live model)
    mask:          (...) bool, the positions the teacher has a distribution for (a cache built from an API's top
                   log-probs may lack some); None = all. Losses weigh the others 0.
    """

    logprobs: Tensor | None
    token_ids: Tensor | None = None
    hidden_states: dict[str, Tensor] | None = None
    temperature: float = 1.0
    mask: Tensor | None = None

    @property
    def sparse(self) -> bool:
        return self.token_ids is not None


class Teacher(Protocol):
    """A callable teacher. `num_classes` is its output width (classes or vocabulary size)."""

    num_classes: int

    def __call__(self, batch: dict[str, Tensor]) -> TeacherOutput: ...
