"""What a `generate` run will cost before it is run (`distill generate --estimate`).

A few prompts, drawn at random, are sent to the teacher with the run's own settings (template, sampling, `n`); their
answers are measured and thrown away (the output file is not touched). From them:

- prompt tokens: the sampled requests' prompt tokens per character of prompt text, times the characters of every
  request of the run (so long and short prompts weigh what they will);
- completion tokens: the sampled answers' mean length, times every sample of the run (prompts x n);
- cost: those tokens at the client's prices;
- wall time: the sampled requests' mean latency, times the requests of the run, over the requests in flight at once
  (`concurrency`): this assumes the server keeps up with that many as it kept up with the sample's.

The same figures are given for what remains to be asked (samples already in the output file are done).
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from distill.config import GenerateOptions
from distill.errors import DistillError
from distill.generate.answers import (
    Job,
    client_with,
    params_with,
    plan,
    prepare,
    read_output,
    template_with,
)
from distill.generate.budget import check_max_cost
from distill.generate.client import Completion, TeacherClient, run_async
from distill.generate.prompts import PromptRecord
from distill.generate.request import Endpoint, RequestParams, ask

DEFAULT_SAMPLE_PROMPTS = 8
MAX_SAMPLE_PROMPTS = 1_000


def check_sample_prompts(count: int, name: str = "sample_prompts") -> int:
    """`count` when it is a whole number of prompts in [1, MAX_SAMPLE_PROMPTS], else a DistillError naming `name`."""
    if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= MAX_SAMPLE_PROMPTS:
        raise DistillError(f"{name} must be 1 to {MAX_SAMPLE_PROMPTS} prompts, got {count}")
    return count


@dataclass
class Estimate:
    """The expected tokens, cost and wall time of a whole `generate` run, and of what remains of it."""

    prompts: int
    samples: int
    requests: int
    prompt_tokens: int
    completion_tokens: int
    tokens: int
    cost: float
    seconds: float
    remaining_samples: int
    remaining_requests: int
    remaining_tokens: int
    remaining_cost: float
    remaining_seconds: float
    sampled_prompts: int
    """Prompts sent to measure (their answers are not kept)."""
    sampled_answers: int
    prompt_tokens_per_char: float
    completion_tokens_per_answer: float
    seconds_per_request: float
    concurrency: int
    sample_cost: float
    """What measuring cost."""
    sample_seconds: float
    max_cost: float | None = None
    within_budget: bool | None = None
    """Whether the whole run's expected cost fits `max_cost` (None without one)."""


@dataclass
class _Measured:
    chars: int
    prompt_tokens: int
    answers: int
    completion_tokens: int
    latencies: list[float]


def request_chars(record: PromptRecord) -> int:
    """The characters of prompt text one request sends (every message's content of a conversation)."""
    if record.messages is not None:
        return sum(len(content) for _, content in record.messages)
    return len(record.prompt or "")


async def _measure(
    client: TeacherClient, endpoint: Endpoint, records: Sequence[PromptRecord], params: RequestParams, n: int
) -> _Measured:
    async def one(record: PromptRecord) -> tuple[list[Completion], float]:
        start = time.monotonic()
        completions = await ask(client, endpoint, record, params, list(range(n)))
        return completions, time.monotonic() - start

    results = await asyncio.gather(*(one(record) for record in records))
    return _Measured(
        chars=sum(request_chars(record) for record in records),
        prompt_tokens=sum(completions[0].prompt_tokens for completions, _ in results),
        answers=sum(len(completions) for completions, _ in results),
        completion_tokens=sum(c.completion_tokens for completions, _ in results for c in completions),
        latencies=[seconds for _, seconds in results],
    )


async def aestimate(
    prompts: Sequence[PromptRecord | str],
    client: TeacherClient,
    out_path: Path,
    n: int = 1,
    params: RequestParams = RequestParams(),
    *,
    template: str | None = None,
    transform: Callable[[PromptRecord], PromptRecord] | None = None,
    endpoint: Endpoint = "chat",
    sample_prompts: int = DEFAULT_SAMPLE_PROMPTS,
    seed: int = 0,
    max_cost: float | None = None,
) -> Estimate:
    """Estimate a `generate` run of `prompts` with these settings (see the module docstring) by sending
    `sample_prompts` of them, drawn with `seed`; `out_path` is only read, for what is already done."""
    check_sample_prompts(sample_prompts)
    if max_cost is not None:
        check_max_cost(max_cost)
    records = prepare(prompts, n, endpoint, template, transform)
    if not records:
        raise DistillError("there are no prompts to estimate")
    sampled = random.Random(seed).sample(records, min(sample_prompts, len(records)))
    before, started = client.usage.snapshot(), time.monotonic()
    measured = await _measure(client, endpoint, sampled, params, n)
    used = client.usage.since(before)
    if used.missing_usage:
        raise DistillError(
            f"the teacher API sent {used.missing_usage} of {len(sampled)} answers without token counts (usage), "
            "so their tokens and cost cannot be measured"
        )
    if measured.chars == 0 or measured.answers == 0:
        raise DistillError("the sampled prompts are empty or got no answers: nothing to measure")
    done, _ = read_output(Path(out_path), repair=False)  # the estimate writes nothing
    everything, _ = plan(records, client.model, n, params, endpoint, set(), n)
    remaining, _ = plan(records, client.model, n, params, endpoint, done, n)
    return _extrapolate(
        client, measured, everything, remaining, len(records), used.cost, time.monotonic() - started, max_cost
    )


def _extrapolate(
    client: TeacherClient,
    measured: _Measured,
    everything: Sequence[Job],
    remaining: Sequence[Job],
    prompts: int,
    sample_cost: float,
    sample_seconds: float,
    max_cost: float | None,
) -> Estimate:
    per_char = measured.prompt_tokens / measured.chars
    per_answer = measured.completion_tokens / measured.answers
    latency = sum(measured.latencies) / len(measured.latencies)
    concurrency = client.concurrency

    def expected(jobs: Sequence[Job]) -> tuple[int, int, int, float, float]:
        """(samples, prompt tokens, completion tokens, cost, seconds) of these requests."""
        samples = sum(len(job.indices) for job in jobs)
        chars = sum(request_chars(job.record) for job in jobs)
        prompt_tokens, completion_tokens = round(per_char * chars), round(per_answer * samples)
        seconds = latency * math.ceil(len(jobs) / concurrency) if jobs else 0.0
        return samples, prompt_tokens, completion_tokens, client.prices.cost(prompt_tokens, completion_tokens), seconds

    samples, prompt_tokens, completion_tokens, cost, seconds = expected(everything)
    left, left_prompt, left_completion, left_cost, left_seconds = expected(remaining)
    return Estimate(
        prompts=prompts, samples=samples, requests=len(everything), prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens, tokens=prompt_tokens + completion_tokens, cost=cost, seconds=seconds,
        remaining_samples=left, remaining_requests=len(remaining), remaining_tokens=left_prompt + left_completion,
        remaining_cost=left_cost, remaining_seconds=left_seconds, sampled_prompts=len(measured.latencies),
        sampled_answers=measured.answers, prompt_tokens_per_char=per_char, completion_tokens_per_answer=per_answer,
        seconds_per_request=latency, concurrency=concurrency, sample_cost=sample_cost, sample_seconds=sample_seconds,
        max_cost=max_cost, within_budget=None if max_cost is None else cost <= max_cost,
    )  # fmt: skip


def estimate_with(
    options: GenerateOptions,
    prompts: Sequence[PromptRecord | str],
    base_url: str,
    model: str,
    api_key: str | None,
    out_path: Path,
    sample_prompts: int = DEFAULT_SAMPLE_PROMPTS,
) -> Estimate:
    """`aestimate` with the settings of `distill generate` (see `generate_with`; `options.max_cost` the budget it is
    compared with), in an event loop of its own."""
    client = client_with(options, base_url, model, api_key)

    async def run() -> Estimate:
        try:
            return await aestimate(
                prompts, client, out_path, options.n, params_with(options), template=template_with(options),
                endpoint=options.endpoint, sample_prompts=sample_prompts, seed=options.seed or 0, max_cost=options.max_cost,
            )  # fmt: skip
        finally:
            await client.aclose()

    return run_async(run)
