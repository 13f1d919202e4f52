"""The output file of `distill generate`: one JSONL row per sample (see `distill.generate.answers`), appended and
flushed as each answer arrives. Reading it back gives the ids already done (a run resumes from them) and what they
cost (the budget of `--max-cost` covers the whole file)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from distill.errors import DataError
from distill.generate.client import Completion
from distill.generate.prompts import PromptRecord


def read_done(path: Path) -> set[str]:
    """The ids already in an output file. A last line without its newline (cut off by a kill mid-write) is removed
    from the file, so its sample is asked again; any other unreadable line is an error."""
    return read_output(path)[0]


def read_output(path: Path, repair: bool = True) -> tuple[set[str], float]:
    """The ids already in an output file and the sum of their rows' `usage.cost` (see `read_done`); with
    `repair` False an unfinished last line is skipped but left in the file."""
    done: set[str] = set()
    cost = 0.0
    if not path.exists():
        return done, cost
    keep = size = 0
    with path.open("rb") as handle:
        for number, line in enumerate(handle, start=1):
            size += len(line)
            if not line.endswith(b"\n"):
                break  # the last line, unfinished
            keep = size
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                done.add(str(row["id"]))
                cost += _row_cost(row)
            except (ValueError, KeyError, TypeError, RecursionError):
                raise DataError(f"line {number} of {path} is not a sample row; fix or remove the file") from None
    if repair and keep < size:
        with path.open("r+b") as handle:
            handle.truncate(keep)
    return done, cost


def _row_cost(row: dict[str, Any]) -> float:
    """A row's `usage.cost` (0 when absent); a TypeError or ValueError when it is not a finite amount."""
    usage = row.get("usage")
    value = usage.get("cost", 0.0) if isinstance(usage, dict) else 0.0
    cost = float(value or 0.0)
    if isinstance(value, bool | str) or not math.isfinite(cost) or cost < 0:
        raise ValueError("bad cost")
    return cost


def sample_row(record: PromptRecord, sample: str, index: int, completion: Completion, model: str) -> dict[str, Any]:
    """The output row of one sample."""
    row: dict[str, Any] = {"id": sample}
    if record.messages is not None:
        row["messages"] = [{"role": role, "content": content} for role, content in record.messages]
    else:
        row["prompt"] = record.prompt
    row.update(
        completion=completion.text,
        sample_index=index,
        finish_reason=completion.finish_reason,
        model=model,
        usage={
            "prompt_tokens": completion.prompt_tokens,
            "completion_tokens": completion.completion_tokens,
            "cost": completion.cost,
        },
    )
    if completion.logprobs is not None:
        row["top_logprobs"] = completion.logprobs.to_json()
    if completion.reasoning is not None:
        row["reasoning"] = completion.reasoning
    if record.gold is not None:
        row["gold"] = record.gold
    if record.question is not None:
        row["question"] = record.question
    return row
