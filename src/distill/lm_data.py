"""Language-model data: prompt/completion JSONL, chat JSONL and plain text (or the same columns in anything
`datasets` reads: parquet, Arrow, JSON, CSV, saved folders, Hub data sets; see `distill.sources`), tokenized for
next-token training with the loss only on completion tokens.

Accepted JSONL rows (one object per line):

    {"prompt": "...", "completion": "..."}              the loss covers the completion
    {"messages": [{"role": "user", "content": ...}, ...]} the loss covers the last assistant message; the rest is the
                                                          prompt (the tokenizer's chat template when it has one)
    {"messages": [...], "completion": "..."}             a conversation and its answer (`distill generate` output)
    {"text": "..."}                                      the loss covers every token
    {"question": "...", "answer": "..."}                 GSM8K's format: question = prompt, answer = completion

A batch is `{"inputs": {"input_ids", "attention_mask"} (B, T), "labels": (B, T), "kd_mask": (B, T), "prompt_lengths":
(B,), "index": (B,)}` with `labels[b, t] = input_ids[b, t + 1]` where token t + 1 is scored and -100 elsewhere: the
logits at position t are compared with the label at t, so the loss needs no shift.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from distill import sources
from distill.data import IGNORE, json_lines, read_text
from distill.errors import DataError


@dataclass
class Example:
    prompt: str
    completion: str


def parse_row(row: Any, where: str, tokenizer: Any = None) -> Example:
    """One JSONL object as (prompt, completion); a DataError naming the line for anything else."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    if "messages" in row and "completion" in row:  # a conversation and the answer to it (`distill generate`)
        if not isinstance(row["messages"], list) or not isinstance(row["completion"], str):
            raise DataError(f"{where}: messages must be a list and the completion a string")
        return _chat([*row["messages"], {"role": "assistant", "content": row["completion"]}], where, tokenizer)
    if "prompt" in row or "completion" in row:
        prompt, completion = row.get("prompt", ""), row.get("completion")
    elif "question" in row and "answer" in row:
        prompt, completion = row["question"], row["answer"]
    elif "messages" in row:
        return _chat(row["messages"], where, tokenizer)
    elif "text" in row:
        prompt, completion = "", row["text"]
    else:
        keys = ", ".join(sorted(row)) or "none"
        raise DataError(f"{where}: needs prompt/completion, messages, text or question/answer keys (has {keys})")
    if not isinstance(prompt, str) or not isinstance(completion, str) or not completion:
        raise DataError(f"{where}: prompt and completion must be strings and the completion not empty")
    return Example(prompt, completion)


def _chat(messages: Any, where: str, tokenizer: Any) -> Example:
    if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
        raise DataError(f"{where}: messages must be a non-empty list of {{role, content}} objects")
    for m in messages:
        if m.get("role") not in ("system", "user", "assistant") or not isinstance(m.get("content"), str):
            raise DataError(f"{where}: each message needs a role (system, user, assistant) and a string content")
    if messages[-1]["role"] != "assistant":
        raise DataError(f"{where}: the last message must be the assistant's (it is what the student learns)")
    history, answer = messages[:-1], messages[-1]["content"]
    if tokenizer is not None and getattr(tokenizer, "chat_template", None):
        prompt = tokenizer.apply_chat_template(history, tokenize=False, add_generation_prompt=True)
    else:
        prompt = "".join(f"<|{m['role']}|>\n{m['content']}\n" for m in history) + "<|assistant|>\n"
    return Example(prompt, answer)


def read_examples(
    path: Path | str, tokenizer: Any = None, limit: int | None = None, split: str | None = None
) -> list[Example]:
    """Examples from a JSONL file (see the module docstring), a .txt file (one text per non-empty line), or anything
    `datasets` reads (`distill.sources`: parquet, Arrow, JSON, CSV, a saved folder, a Hub id `org/name[:split]`),
    whose rows have the JSONL rows' columns and pass the same checks. `split` chooses a folder's or Hub data set's
    split (default train)."""
    path = Path(path)
    rows: Iterator[tuple[str, Any]]
    if sources.through_datasets(path):
        rows = sources.dataset_rows(path, split)
    elif not path.is_file():
        raise DataError(f"data file {path} does not exist")
    elif path.suffix.lower() == ".txt":
        lines = enumerate(read_text(path).splitlines(), start=1)
        rows = ((f"line {n} of {path}", {"text": line.strip()}) for n, line in lines if line.strip())
    else:
        rows = json_lines(path)
    examples: list[Example] = []
    for where, row in rows:
        if limit is not None and len(examples) >= limit:
            break
        examples.append(parse_row(row, where, tokenizer))
    if not examples:
        raise DataError(f"data file {path} has no examples")
    return examples


class LMDataset:
    """Tokenized prompt + completion sequences; batches padded on the right to their longest row."""

    def __init__(self, sequences: Sequence[Sequence[int]], prompt_lengths: Sequence[int], pad_id: int):
        if len(sequences) != len(prompt_lengths):
            raise DataError(f"{len(sequences)} sequences but {len(prompt_lengths)} prompt lengths")
        self.sequences = [torch.tensor(list(s), dtype=torch.long) for s in sequences]
        self.prompt_lengths = torch.tensor(list(prompt_lengths), dtype=torch.long)
        self.lengths = torch.tensor([len(s) for s in self.sequences], dtype=torch.long)
        short = (self.lengths - self.prompt_lengths < 1) | (self.lengths < 2)
        if bool(short.any()):
            raise DataError(f"sequence {int(short.nonzero()[0, 0])} has no completion token left (too long a prompt?)")
        self.pad_id = pad_id

    def __len__(self) -> int:
        return len(self.sequences)

    def scored(self, i: int) -> Tensor:
        """Which positions t of sequence i are trained on: those whose next token belongs to the completion."""
        n, p = int(self.lengths[i]), int(self.prompt_lengths[i])
        mask = torch.zeros(n, dtype=torch.bool)
        mask[max(p - 1, 0) : n - 1] = True
        return mask

    def batch(self, index: Tensor) -> dict[str, Any]:
        rows = index.tolist()
        width = int(self.lengths[index].max())
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)  # (B, T)
        attention = torch.zeros((len(rows), width), dtype=torch.long)  # (B, T)
        labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)  # (B, T)
        for b, i in enumerate(rows):
            sequence = self.sequences[i]
            n = len(sequence)
            ids[b, :n] = sequence
            attention[b, :n] = 1
            scored = self.scored(i)
            targets = torch.full((n,), IGNORE, dtype=torch.long)
            targets[:-1] = sequence[1:]
            labels[b, :n] = torch.where(scored, targets, IGNORE)
        return {
            "inputs": {"input_ids": ids, "attention_mask": attention},
            "labels": labels,
            "kd_mask": labels != IGNORE,
            "prompt_lengths": self.prompt_lengths[index],
            "index": index,
        }

    def tokens(self) -> int:
        """Scored tokens in the data set."""
        return int((self.lengths - self.prompt_lengths.clamp_min(1)).sum())

    def fingerprint(self) -> str:
        digest = hashlib.sha256()
        for sequence, prompt in zip(self.sequences, self.prompt_lengths.tolist()):
            digest.update(sequence.numpy().tobytes())
            digest.update(str(prompt).encode())
        return digest.hexdigest()


def tokenize_examples(
    tokenizer: Any, examples: Sequence[Example], max_length: int = 512, add_eos: bool = True
) -> LMDataset:
    """Prompt and completion tokenized separately and joined (so the boundary is exact); truncated from the end."""
    eos = getattr(tokenizer, "eos_token_id", None)
    prompts = tokenizer([e.prompt for e in examples], add_special_tokens=False)["input_ids"]
    completions = tokenizer([e.completion for e in examples], add_special_tokens=False)["input_ids"]
    bos = getattr(tokenizer, "bos_token_id", None)
    sequences, prompt_lengths = [], []
    for prompt, completion in zip(prompts, completions):
        head = ([bos] if bos is not None and tokenizer_adds_bos(tokenizer) else []) + list(prompt)
        tail = list(completion) + ([eos] if add_eos and eos is not None else [])
        sequence = (head + tail)[:max_length]
        sequences.append(sequence)
        prompt_lengths.append(min(len(head), len(sequence)))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos if eos is not None else 0)
    return LMDataset(sequences, prompt_lengths, pad)


def tokenizer_adds_bos(tokenizer: Any) -> bool:
    """Whether the tokenizer puts a BOS token in front of a text (Llama-style) when asked for special tokens."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bool(ids) and ids[0] == bos
