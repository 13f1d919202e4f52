"""A spending limit for generation (`distill generate --max-cost`).

A request is sent only while the cost so far, plus the expected cost of the requests in flight, plus its own
expected cost stays within the limit; the first request that would pass it is not sent, and no later one either.
The expected cost of a request is its number of samples times the mean cost per sample: of this run's answers once
there are some, else of the answers already in the output file, and before either exists requests go one at a time
(the first answer sets the estimate). What is spent can still pass the limit by the difference between the expected
and the actual cost of the requests in flight when it is reached.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable

from distill.errors import DistillError

MAX_COST = 1e9
"""The largest budget accepted, in the prices' currency."""


def check_max_cost(limit: float, name: str = "max_cost") -> float:
    """`limit` when it is a finite number in [0, MAX_COST], else a DistillError naming `name` and saying why."""
    if isinstance(limit, bool) or not isinstance(limit, int | float):
        raise DistillError(f"{name} must be a number, got {type(limit).__name__}")
    if not math.isfinite(limit) or not 0 <= limit <= MAX_COST:
        raise DistillError(f"{name} must be a finite amount in [0, {MAX_COST:g}], got {limit}")
    return float(limit)


class CostBudget:
    """Admits requests while their expected cost fits under `limit` (see the module docstring).

    spent:          the cost so far, read at every admission (the output file's earlier cost plus this run's usage)
    before_cost:    the cost of the samples already in the output file, and `before_samples` their number: the
                    estimate per sample until this run has answers of its own
    """

    def __init__(
        self, limit: float, spent: Callable[[], float], before_cost: float = 0.0, before_samples: int = 0
    ) -> None:
        self.limit = check_max_cost(limit)
        self.spent = spent
        self.before_cost = before_cost
        self.before_samples = before_samples
        self.run_cost = 0.0
        self.run_samples = 0
        self.reserved = 0.0
        self.in_flight = 0
        self.reached = False
        self._changed: asyncio.Condition | None = None

    def per_sample(self) -> float | None:
        """The expected cost of one sample, or None before any sample's cost is known."""
        if self.run_samples:
            return self.run_cost / self.run_samples
        if self.before_samples:
            return self.before_cost / self.before_samples
        return None

    async def reserve(self, samples: int) -> float | None:
        """Wait until a request for `samples` may go: the cost reserved for it, or None when the budget is reached
        (this request and every later one stay unsent)."""
        changed = self._condition()
        async with changed:
            while not self.reached:
                per = self.per_sample()
                if per is None and self.in_flight:
                    await changed.wait()  # no estimate yet: one request at a time until the first answer
                    continue
                expected = samples * (per or 0.0)
                spent = self.spent()
                if spent + self.reserved + expected > self.limit or (per is None and spent >= self.limit):
                    self.reached = True
                    break
                self.reserved += expected
                self.in_flight += 1
                return expected
            changed.notify_all()
            return None

    async def release(self, reserved: float, samples: int, cost: float) -> None:
        """A request admitted with `reserved` came back with `samples` answers that cost `cost` (0 and its billed
        cost when it failed)."""
        changed = self._condition()
        async with changed:
            self.reserved -= reserved
            self.in_flight -= 1
            self.run_cost += cost
            self.run_samples += samples
            changed.notify_all()

    def _condition(self) -> asyncio.Condition:
        if self._changed is None:
            self._changed = asyncio.Condition()
        return self._changed
