"""Greedy answers of a language model to word problems, their final answers checked against the gold ones, and a
tally of the calculations written in them: how the reasoning recipe scores its models."""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Sequence
from typing import Any

from torch import nn

from distill.engine import Engine
from distill.engine import SamplingParams as EngineParams
from distill.engine import Sequence as Row
from distill.generate.verify import Problem, extract_answer, verify

CALCULATION = re.compile(r"(\d+) ([-+*/]) (\d+) = (\d+)")
OPERATIONS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b, "/": lambda a, b: a / b}


def solve(
    model: nn.Module,
    tokenizer: Any,
    problems: Sequence[Problem],
    prompt_of: Callable[[Problem], str],
    max_tokens: int,
    batch_size: int = 64,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Greedy answers to `problems`, each asked as `prompt_of(problem)` (batched generation with the serving
    engine): the accuracy of their final answers and one prediction row per problem."""
    engine = Engine(model, tokenizer)
    rows: list[dict[str, Any]] = []
    generated = 0
    started = time.perf_counter()
    for start in range(0, len(problems), batch_size):
        chunk = problems[start : start + batch_size]
        sequences = [
            Row(engine.encode(prompt_of(p)), EngineParams(max_tokens=max_tokens, temperature=0.0)) for p in chunk
        ]
        engine.generate(sequences)
        for problem, sequence in zip(chunk, sequences):
            predicted, generated = extract_answer(sequence.text), generated + sequence.generated
            ok = verify(predicted, problem.answer).ok
            rows.append({"id": problem.id, "question": problem.question, "gold": problem.answer,
                         "completion": sequence.text, "predicted": predicted, "correct": ok})  # fmt: skip
    seconds = time.perf_counter() - started
    correct = sum(row["correct"] for row in rows)
    scores = {"accuracy": correct / max(len(rows), 1), "correct": correct, "problems": len(rows),
              "calculations": calculations([row["completion"] for row in rows]), "generated_tokens": generated,
              "eval_seconds": seconds}  # fmt: skip
    return scores, rows


def calculations(texts: Sequence[str]) -> dict[str, dict[str, int]]:
    """Per operation (+ - * /), how many of the calculations "a op b = c" written in `texts` are right."""
    tally = {op: {"right": 0, "written": 0} for op in OPERATIONS}
    for text in texts:
        for a, op, b, result in CALCULATION.findall(text):
            tally[op]["written"] += 1
            tally[op]["right"] += int(OPERATIONS[op](int(a), int(b)) == int(result))
    return tally
