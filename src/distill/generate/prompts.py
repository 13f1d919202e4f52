"""Prompts for a teacher: the records `distill generate` sends, read from JSONL or text files, and templates.

Accepted prompt rows (JSONL, one object per line; or a .txt file with one prompt per line):

    {"prompt": "...", "gold"?: ...}            sent as a user message (or as is to /completions)
    {"question": "...", "answer": "..."}       GSM8K: the question is the prompt, the answer is kept as gold
    {"messages": [{"role", "content"}, ...]}   a conversation; a last assistant message is dropped (the teacher
                                               writes that turn)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from distill.data import json_lines, read_text
from distill.errors import DataError, DistillError


@dataclass(frozen=True)
class PromptRecord:
    """One prompt: a plain `prompt` or a conversation (`messages`), with the reference answer when known."""

    prompt: str | None = None
    messages: tuple[tuple[str, str], ...] | None = None
    """(role, content) pairs."""
    gold: str | None = None
    question: str | None = None
    """The prompt before a template rewrote it (set by `apply_template`)."""

    @property
    def text(self) -> str:
        """The prompt, or the last user message of a conversation."""
        if self.prompt is not None:
            return self.prompt
        return next((content for role, content in reversed(self.messages or ()) if role == "user"), "")

    def with_text(self, text: str) -> PromptRecord:
        """The same record with the prompt (or the last user message) replaced."""
        if self.prompt is not None or not self.messages:
            return replace(self, prompt=text)
        messages = list(self.messages)
        last = max(i for i, (role, _) in enumerate(messages) if role == "user")
        messages[last] = ("user", text)
        return replace(self, messages=tuple(messages))


def read_prompts(path: Path, limit: int | None = None) -> list[PromptRecord]:
    """Prompt records from a JSONL file (see the module docstring) or a .txt file (one prompt per line)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"prompt file {path} does not exist")
    records: list[PromptRecord] = []
    if path.suffix.lower() == ".txt":
        texts = [line.strip() for line in read_text(path).splitlines() if line.strip()]
        records = [PromptRecord(prompt=text) for text in texts[:limit]]
    elif limit is None or limit > 0:
        for where, row in json_lines(path):  # stops at the limit: lines after it are not read
            records.append(parse_prompt(row, where))
            if limit is not None and len(records) >= limit:
                break
    if not records:
        raise DataError(f"prompt file {path} has no prompts")
    return records


def parse_prompt(row: Any, where: str) -> PromptRecord:
    """One JSONL object as a prompt record; a DataError naming the line for anything else."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    gold = row.get("gold", row.get("answer"))
    if gold is not None and not isinstance(gold, str | int | float):
        raise DataError(f"{where}: the gold answer must be a string or a number")
    gold = None if gold is None else str(gold)
    for key in ("prompt", "question"):
        if key in row:
            if not isinstance(row[key], str) or not row[key]:
                raise DataError(f"{where}: {key} must be a non-empty string")
            return PromptRecord(prompt=row[key], gold=gold)
    if "messages" in row:
        messages = row["messages"]
        if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
            raise DataError(f"{where}: messages must be a list of {{role, content}} objects")
        pairs = [(m.get("role"), m.get("content")) for m in messages]
        if any(role not in ("system", "user", "assistant") or not isinstance(text, str) for role, text in pairs):
            raise DataError(f"{where}: each message needs a role (system, user, assistant) and a string content")
        if pairs and pairs[-1][0] == "assistant":
            pairs = pairs[:-1]
        if not pairs or pairs[-1][0] != "user":
            raise DataError(f"{where}: the conversation must end with a user message for the teacher to answer")
        return PromptRecord(messages=tuple((str(r), str(t)) for r, t in pairs), gold=gold)
    keys = ", ".join(sorted(row)) or "none"
    raise DataError(f"{where}: needs a prompt, question or messages key (has {keys})")


def apply_template(template: str) -> Callable[[PromptRecord], PromptRecord]:
    """A transform that puts each prompt into a template where `{question}` stands, e.g. "{question}\nThink step
    by step and end with #### <answer>." Plain replacement: other braces in the template (\\boxed{}) stay as they are.
    """
    if "{question}" not in template:
        raise DistillError(f"the prompt template {template!r} must contain '{{question}}' where the prompt goes")

    def transform(record: PromptRecord) -> PromptRecord:
        text = record.text
        return replace(record.with_text(template.replace("{question}", text)), question=text)

    return transform
