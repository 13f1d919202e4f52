"""What a run works in (`RunContext`), and a stage of a run: trained, or loaded when a resumed run finished it.

A finished stage is a folder holding what the stage made (written by its `save`) and, written last and atomically,
`history.json`: the record of its training (history, seconds, and whatever else the stage keeps). A resumed run
that finds the record loads the stage instead of training it again; a run killed during a stage left no record, so
the stage runs again and its training continues from its own checkpoints. Every recipe's stages go through here.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from distill.data import read_json
from distill.progress import NULL, Reporter

RECORD = "history.json"
M = TypeVar("M")


@dataclass(frozen=True)
class RunContext:
    """Where a run writes, whether it continues an earlier attempt there, whom it reports to, and what it may
    reuse: `store` keeps generated data sets and extracted or fine-tuned models between runs, `datasets` is the
    folder of the reference data sets (sst2/, stsb/, agnews/)."""

    output: Path
    resume: bool = False
    reporter: Reporter = NULL
    store: Path | None = None
    datasets: Path | None = None


def write_record(path: Path, record: dict[str, Any]) -> None:
    """`record` as JSON at `path`, atomically (a kill mid-write leaves the previous file or none)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(record))
    tmp.replace(path)


def train_or_resume(
    directory: Path,
    *,
    resume: bool,
    train: Callable[[], tuple[M, dict[str, Any]]],
    save: Callable[[M, Path], None],
    load: Callable[[Path], M],
    keys: Sequence[str] = ("history", "seconds"),
) -> tuple[M, dict[str, Any]]:
    """(what the stage made, its record): loaded from `directory` when `resume` finds the stage finished there,
    else trained by `train()`, saved with `save` and recorded. The record must hold `keys`."""
    record_path = directory / RECORD
    if resume and record_path.is_file():
        return load(directory), read_json(record_path, keys)
    made, record = train()
    missing = [key for key in keys if key not in record]
    if missing:
        raise ValueError(f"a stage's record lacks {', '.join(missing)}")
    directory.mkdir(parents=True, exist_ok=True)
    save(made, directory)
    write_record(record_path, record)
    return made, record
