"""The files of a training run's checkpoint: written atomically, read back as tensors and plain data only.

What a checkpoint holds, and when it is written and resumed, is `distill.train`'s business; this module only keeps
the file safe: a kill mid-write leaves the previous checkpoint, and a crafted file cannot run code when loaded.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from distill.errors import DistillError

CHECKPOINT = "checkpoint.pt"
REQUIRED = {"signature", "model", "optimizer", "scheduler", "state"}


def plain(value: Any) -> Any:
    """`value` with numpy scalars and arrays made Python numbers and lists (dicts, lists and tuples walked; tensors
    and plain values kept): what a checkpoint holds must load with `torch.load(weights_only=True)`."""
    if isinstance(value, dict):
        return {key: plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(plain(item) for item in value)
    if isinstance(value, (np.generic, np.ndarray)):
        return value.tolist()
    return value


def load(path: Path, device: torch.device) -> dict[str, Any]:
    """A checkpoint written by `distill.train`, loaded with `weights_only=True`: tensors and plain data only, so a
    crafted file cannot run code; anything else is a DistillError."""
    try:
        saved = torch.load(path, map_location=device, weights_only=True)
    except Exception:  # a truncated, foreign or crafted file (pickle, zip and torch raise many types)
        raise DistillError(
            f"cannot read checkpoint {path}: it is not a distill checkpoint of tensors and plain data (nothing in it "
            "was run); delete it to start over"
        ) from None
    if not isinstance(saved, dict) or not set(saved) >= REQUIRED:
        raise DistillError(f"cannot read checkpoint {path}: it is not a distill checkpoint; delete it to start over")
    return saved


def save(path: Path, payload: dict[str, Any]) -> None:
    """Write `payload` to `path` atomically: a kill mid-write leaves the previous checkpoint intact."""
    tmp = path.with_suffix(".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)
