"""What the optimizer is given at each step of a run (for tests that compare two ways of training)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook


def step_gradients(run: Callable[[], Any]) -> tuple[list[list[torch.Tensor]], Any]:
    """The gradients every optimizer step of `run()` applies (after clipping), and what `run()` returned."""
    seen: list[list[torch.Tensor]] = []
    hook = register_optimizer_step_pre_hook(
        lambda optimizer, *_: seen.append([p.grad.clone() for g in optimizer.param_groups for p in g["params"]])
    )
    try:
        result = run()
    finally:
        hook.remove()
    return seen, result
