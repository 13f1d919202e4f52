"""An LM cascade's threshold, chosen on a validation file: the student answers its prompts (batched generation, with
its confidence in each answer), the teacher's answers come from the file or from the teacher, and
`distill.cascade_curve.choose` takes the lowest threshold that keeps the target (with 95 % confidence by default).

The validation file is JSONL, one object per line: `prompt` (a completions prompt, text) or `messages` (a chat
conversation, as the chat endpoint takes it), and optionally `answer` (the gold answer) and `teacher` (the teacher's
answer; rows without one are answered by the teacher, greedily). When every row has a gold answer the cascade is
judged by its accuracy, as a share of the teacher's; otherwise by its agreement with the teacher's answers. `id` may
name a row; other keys are refused. Answers are generated greedily, at most `max_tokens` tokens each.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import TypeAdapter, ValidationError

from distill import cascade_curve
from distill.data import json_lines
from distill.engine import Engine, PromptTooLong, SamplingParams
from distill.engine import Sequence as Row
from distill.errors import DataError
from distill.generate.client import TeacherClient
from distill.lm_confidence import ConfidenceConfig, confidence, same_answer
from distill.serve.requests import Message, chat_prompt

MAX_ROWS = 100_000
MAX_TEXT = 1_000_000  # characters of one prompt, answer or message
KEYS = {"id", "prompt", "messages", "answer", "teacher"}
Reference = Literal["gold", "teacher"]
_MESSAGES = TypeAdapter(list[Message])


@dataclass(frozen=True)
class ValidationRow:
    where: str  # "line 3 of val.jsonl"
    prompt: str | None = None
    messages: list[Message] | None = None
    answer: str | None = None  # gold
    teacher: str | None = None  # the teacher's answer


@dataclass(frozen=True)
class Answered:
    text: str
    confidence: float  # lm_confidence.confidence; -inf: refused by the verifier


@dataclass(frozen=True)
class Calibration:
    choice: cascade_curve.Choice
    curve: list[cascade_curve.Point]
    reference: Reference  # what the answers were judged against
    student: list[Answered]
    teacher: list[str]


def _text(value: Any, where: str, key: str) -> str | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise DataError(f"{where}: {key} must be a string (or a number), not {type(value).__name__}")
    text = str(value)
    if len(text) > MAX_TEXT:
        raise DataError(f"{where}: {key} is {len(text):,} characters, over the {MAX_TEXT:,} a row may hold")
    return text


def _row(where: str, value: Any) -> ValidationRow:
    if not isinstance(value, dict):
        raise DataError(f'{where} is not a JSON object; give {{"prompt": ..., "answer": ...}} per line')
    unknown = sorted(set(value) - KEYS)
    if unknown:
        raise DataError(f"{where} has unknown key {unknown[0]!r}; a row takes {', '.join(sorted(KEYS))}")
    if ("prompt" in value) == ("messages" in value):
        raise DataError(f"{where} needs exactly one of prompt (text) and messages (a chat conversation)")
    messages = None
    if "messages" in value:
        try:
            messages = _MESSAGES.validate_python(value["messages"])
        except ValidationError as error:
            first = error.errors()[0]
            place = ".".join(str(p) for p in first["loc"])
            raise DataError(f"{where}: messages{'.' + place if place else ''}: {first['msg']}") from None
        if not messages or sum(len(m.text()) for m in messages) > MAX_TEXT:
            raise DataError(f"{where}: messages must hold 1 to {MAX_TEXT:,} characters of conversation")
    prompt = _text(value.get("prompt"), where, "prompt") if "prompt" in value else None
    if prompt is not None and not prompt:
        raise DataError(f"{where}: prompt is empty")
    return ValidationRow(where, prompt, messages, _text(value.get("answer"), where, "answer"),
                         _text(value.get("teacher"), where, "teacher"))  # fmt: skip


def read_validation(path: Path) -> list[ValidationRow]:
    """The rows of a validation file (module docstring); a DataError naming the line for anything else, and for a
    file with no rows."""
    rows: list[ValidationRow] = []
    for where, value in json_lines(path):
        if len(rows) == MAX_ROWS:
            raise DataError(f"{path} holds more than {MAX_ROWS:,} validation rows")
        rows.append(_row(where, value))
    if not rows:
        raise DataError(f"{path} holds no validation rows; give one JSON object per line, with a prompt")
    return rows


def prompt_ids(engine: Engine, row: ValidationRow, max_tokens: int) -> list[int]:
    """The row's prompt as the student's token ids, as its endpoint would read it (chat: the chat template)."""
    text, special = (row.prompt, True) if row.messages is None else chat_prompt(engine.tokenizer, row.messages)
    assert text is not None
    try:
        ids = engine.encode(text, special_tokens=special)
    except PromptTooLong as error:
        raise DataError(f"{row.where}: the prompt is {error.chars:,} characters, too long for the student") from None
    if len(ids) + max_tokens > engine.context:
        raise DataError(
            f"{row.where}: the prompt is {len(ids)} tokens; with {max_tokens} to generate it does not fit the "
            f"student's context of {engine.context}"
        )
    return ids


def with_logprobs(params: SamplingParams) -> SamplingParams:
    """`params` that also keep the generated tokens' log-probs (the confidence needs them)."""
    return params if params.top_logprobs is not None else replace(params, top_logprobs=0)


def sample_rows(config: ConfidenceConfig, ids: list[int], params: SamplingParams, seed: int | None) -> list[Row]:
    """The k answers the agreement measure samples for one prompt (none for the log-prob measure)."""
    if config.measure != "agreement":
        return []
    return [
        Row(list(ids), replace(params, temperature=config.sample_temperature, top_p=1.0, top_logprobs=None,
                               prompt_logprobs=None, seed=None if seed is None else (seed + j) % 2**63))
        for j in range(config.samples)
    ]  # fmt: skip


def row_confidence(config: ConfidenceConfig, row: Row, samples: Sequence[Row]) -> float:
    return confidence(config, row.text, [entry.logprob for entry in row.logprobs], [s.text for s in samples])


def generate(
    engine: Engine, prompts: list[list[int]], config: ConfidenceConfig | None, max_tokens: int, batch_size: int = 64,
    seed: int = 0,
) -> list[tuple[Row, list[Row]]]:  # fmt: skip
    """Greedy answers to `prompts` (token ids) with their tokens' log-probs, in batches of `batch_size` prompts, each
    with the k answers the agreement measure of `config` samples (seeded from `seed`; none for other measures)."""
    done: list[tuple[Row, list[Row]]] = []
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, top_logprobs=0)
    for start in range(0, len(prompts), batch_size):
        rows = [Row(list(ids), params) for ids in prompts[start : start + batch_size]]
        samples = [sample_rows(config, row.prompt_ids, params, seed + (start + i) * 64) if config else []
                   for i, row in enumerate(rows)]  # fmt: skip
        engine.generate([*rows, *(s for group in samples for s in group)])
        done += zip(rows, samples)
    return done


def answer(
    engine: Engine, prompts: list[list[int]], config: ConfidenceConfig | None, max_tokens: int, batch_size: int = 64,
    seed: int = 0,
) -> list[Answered]:  # fmt: skip
    """`generate`'s answers with the confidence `config` measures in each (None: no confidence, nan)."""
    return [
        Answered(row.text, float("nan") if config is None else row_confidence(config, row, samples))
        for row, samples in generate(engine, prompts, config, max_tokens, batch_size, seed)
    ]


async def _ask(client: TeacherClient, row: ValidationRow, max_tokens: int) -> str:
    if row.messages is not None:
        messages = [m.model_dump(exclude_none=True) for m in row.messages]
        (reply,) = await client.chat(messages, temperature=0.0, max_tokens=max_tokens)
    else:
        assert row.prompt is not None
        (reply,) = await client.complete(row.prompt, temperature=0.0, max_tokens=max_tokens)
    return reply.text


def teacher_answers(client: TeacherClient, rows: list[ValidationRow], max_tokens: int) -> list[str]:
    """The teacher's answers: the file's, else asked of the teacher's endpoint (greedy; `client` retries)."""
    missing = [i for i, row in enumerate(rows) if row.teacher is None]

    async def ask_all() -> list[str]:
        async with client:
            return list(await asyncio.gather(*(_ask(client, rows[i], max_tokens) for i in missing)))

    asked = dict(zip(missing, asyncio.run(ask_all()) if missing else []))
    return [row.teacher if row.teacher is not None else asked[i] for i, row in enumerate(rows)]


def judge(
    student: list[Answered],
    teacher: list[str],
    gold: list[str | None],
    config: ConfidenceConfig,
    target: float,
    assurance: float = cascade_curve.ASSURANCE,
) -> Calibration:
    """The curve and the chosen threshold (`cascade_curve.choose`: the target reached by the lower bound at level
    `assurance`): judged by accuracy when every row has a gold answer, else by agreement with the teacher."""
    reference: Reference = "gold" if all(g is not None for g in gold) else "teacher"
    refs = [g or "" for g in gold] if reference == "gold" else teacher
    student_ok = torch.tensor([same_answer(s.text, r, config.answers) for s, r in zip(student, refs)])  # (N,)
    teacher_ok = torch.tensor([same_answer(t, r, config.answers) for t, r in zip(teacher, refs)])  # (N,)
    if reference == "teacher":
        teacher_ok = torch.ones_like(student_ok)
    measured = torch.tensor([s.confidence for s in student], dtype=torch.float64)  # (N,)
    choice = cascade_curve.choose(measured, student_ok, teacher_ok, target, assurance)
    points = cascade_curve.curve(measured, student_ok, teacher_ok)
    return Calibration(choice, points, reference, student, teacher)


def calibrate(
    engine: Engine,
    rows: list[ValidationRow],
    teacher: Callable[[list[ValidationRow]], list[str]],
    config: ConfidenceConfig,
    target: float,
    max_tokens: int,
    batch_size: int = 64,
    assurance: float = cascade_curve.ASSURANCE,
) -> Calibration:
    """The student (`engine`) answers the rows' prompts; `teacher` gives the teacher's answers to the rows
    (`teacher_answers` through its endpoint, or a local engine's); then `judge`."""
    prompts = [prompt_ids(engine, row, max_tokens) for row in rows]
    student = answer(engine, prompts, config, max_tokens, batch_size)
    return judge(student, teacher(rows), [row.answer for row in rows], config, target, assurance)
