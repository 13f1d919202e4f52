"""A teacher's answers to prompts, asked through its API (`TeacherClient`) and written to a JSONL file that training
reads, resumably.

Each sample gets a content-hash id: sha256 of the prompt as sent (or the messages), the model, the endpoint, the
sampling parameters and the sample index. `generate` first reads the ids already in the output file and asks the
teacher only for the missing ones, appending each result as one line and flushing it at once. A run that was
killed therefore resumes where it stopped: nothing is asked twice, nothing is written twice, and a last line cut off
by the kill is dropped and asked again.

One output row per sample:

    {"id", "prompt" | "messages", "completion", "sample_index", "finish_reason", "model",
     "usage": {"prompt_tokens", "completion_tokens", "cost"},
     "top_logprobs": {"tokens", "logprobs", "top"}   when log-probs were asked for and served
     "reasoning"                                      when the server returns a separate reasoning trace
     "gold"                                           when the prompt row had a reference answer
     "question"                                       the prompt before the template, when one was applied}

The prompts are read by `distill.generate.prompts` (re-exported here). With `max_cost` the run also keeps to a
budget over the whole output file (`distill.generate.budget`): it stops before the request that would pass it,
keeps what it wrote, and says so in its summary (`budget_reached`); a rerun with a larger budget continues.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distill.config import GenerateOptions
from distill.errors import DataError, DistillError
from distill.generate.budget import CostBudget, check_max_cost
from distill.generate.client import Completion, Prices, TeacherClient, TeacherClientError, Usage, run_async, run_workers
from distill.generate.output import read_done, read_output, sample_row
from distill.generate.prompts import PromptRecord, apply_template, parse_prompt, read_prompts
from distill.generate.request import Endpoint, RequestParams, ask, sample_id
from distill.progress import NULL, Cancelled, Reporter

__all__ = ["Endpoint", "GenerateSummary", "PromptRecord", "RequestParams", "agenerate", "apply_template", "generate",
           "generate_with", "parse_prompt", "read_done", "read_prompts", "sample_id"]  # fmt: skip


@dataclass
class GenerateSummary:
    """What a `generate` run did: samples `written`, `skipped` (already in the file, or a repeated prompt),
    `failed` (their request gave up; a rerun asks again), the teacher's usage and `cost` of this run, and the time
    it took. `total_cost` is the cost of the whole output file so far (earlier runs' rows included), which is what
    `max_cost` limits; `budget_reached` is True when the run stopped at that limit, leaving `not_asked` samples
    for a rerun with a larger budget."""

    path: Path
    written: int = 0
    skipped: int = 0
    failed: int = 0
    requests: int = 0
    retries: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost: float = 0.0
    elapsed: float = 0.0
    total_cost: float = 0.0
    max_cost: float | None = None
    budget_reached: bool = False
    not_asked: int = 0

    @property
    def rate(self) -> float:
        """Samples written per second."""
        return self.written / self.elapsed if self.elapsed > 0 else 0.0


# ----------------------------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class Job:
    """One request still to make: samples `indices` of a prompt, to be written under `ids`."""

    record: PromptRecord
    indices: list[int]
    ids: list[str]


@dataclass
class _Run:
    client: TeacherClient
    params: RequestParams
    endpoint: Endpoint
    handle: Any
    reporter: Reporter
    summary: GenerateSummary
    max_failures: int
    started: float
    budget: CostBudget | None = None
    failed_requests: int = 0

    async def work(self, jobs: Iterator[Job]) -> None:
        for job in jobs:
            if self.reporter.cancelled():
                raise Cancelled("generation cancelled; rerun to resume")
            if self.budget is None:
                await self.one(job)
                continue
            reserved = await self.budget.reserve(len(job.indices))
            if reserved is None:  # the budget is reached: this job and the rest stay for a rerun
                self.summary.not_asked += len(job.indices) + sum(len(rest.indices) for rest in jobs)
                return
            completions: list[Completion] = []
            try:
                completions = await self.one(job)
            finally:
                await self.budget.release(reserved, len(completions), sum(c.cost for c in completions))

    async def one(self, job: Job) -> list[Completion]:
        """Ask for a job's samples and write them; [] when its request gave up (left for a rerun)."""
        try:
            completions = await ask(self.client, self.endpoint, job.record, self.params, job.indices)
        except TeacherClientError as error:
            if not error.retryable:
                raise
            self.failed_requests += 1
            self.summary.failed += len(job.indices)
            self.reporter.event("failed", message=str(error), samples=len(job.indices))
            if self.failed_requests > self.max_failures:
                raise TeacherClientError(
                    f"{self.failed_requests} teacher requests failed for good, so generation stopped (rerun to resume "
                    f"once the teacher API is healthy); the last: {error}"
                ) from error
            return []
        model = self.client.model
        for index, sample, completion in zip(job.indices, job.ids, completions):
            row = sample_row(job.record, sample, index, completion, model)
            self.handle.write(json.dumps(row, ensure_ascii=False) + "\n")
            self.handle.flush()
        self.summary.written += len(completions)
        usage = self.client.usage
        elapsed = time.monotonic() - self.started
        self.reporter.advance(
            len(completions),
            samples_per_s=self.summary.written / max(elapsed, 1e-9),
            tokens=float(usage.prompt_tokens + usage.completion_tokens),
            cost=usage.cost,
        )
        return completions


def prepare(
    prompts: Sequence[PromptRecord | str],
    n: int,
    endpoint: Endpoint,
    template: str | None = None,
    transform: Callable[[PromptRecord], PromptRecord] | None = None,
) -> list[PromptRecord]:
    """The prompt records as they will be sent: checked against `n` and the endpoint, the template applied (before
    `transform`)."""
    if n < 1:
        raise DistillError(f"n must be at least 1, got {n}")
    if endpoint not in ("chat", "completions"):
        raise DistillError(f"endpoint must be 'chat' or 'completions', got {endpoint!r}")
    records = [PromptRecord(prompt=p) if isinstance(p, str) else p for p in prompts]
    if endpoint == "completions" and any(r.messages is not None for r in records):
        raise DataError("conversations (messages) need the chat endpoint, not completions")
    if template is not None:
        records = [apply_template(template)(r) for r in records]
    if transform is not None:
        records = [transform(r) for r in records]
    return records


def plan(
    prompts: Sequence[PromptRecord],
    model: str,
    n: int,
    params: RequestParams,
    endpoint: Endpoint,
    done: set[str],
    samples_per_request: int,
) -> tuple[list[Job], int]:
    """The requests still to make and the number of samples skipped (done already or repeated)."""
    jobs: list[Job] = []
    skipped = 0
    seen = set(done)
    for record in prompts:
        missing = []
        for index in range(n):
            sample = sample_id(record, model, params, endpoint, index)
            if sample in seen:
                skipped += 1
            else:
                seen.add(sample)
                missing.append((index, sample))
        for start in range(0, len(missing), samples_per_request):
            chunk = missing[start : start + samples_per_request]
            jobs.append(Job(record, [i for i, _ in chunk], [s for _, s in chunk]))
    return jobs, skipped


async def agenerate(
    prompts: Sequence[PromptRecord | str],
    client: TeacherClient,
    out_path: Path,
    n: int = 1,
    params: RequestParams = RequestParams(),
    reporter: Reporter = NULL,
    *,
    template: str | None = None,
    transform: Callable[[PromptRecord], PromptRecord] | None = None,
    endpoint: Endpoint = "chat",
    samples_per_request: int | None = None,
    concurrency: int | None = None,
    max_failures: int = 10,
    max_cost: float | None = None,
) -> GenerateSummary:
    """Ask `client` for `n` samples of every prompt and append them to `out_path` (see the module docstring).

    template:            a template with `{question}` applied to each prompt (before `transform`), see `apply_template`
    transform:           any rewrite of each prompt record (a CoT prompt, a system message)
    endpoint:            "chat" (a plain prompt becomes one user message) or "completions" (the raw prompt)
    samples_per_request: samples asked per request (n by default; 1 for servers without n > 1)
    concurrency:         requests in flight (the client's limit by default)
    max_failures:        requests that may give up (their samples are left for a rerun) before the run stops
    max_cost:            the most the whole output file may cost (earlier runs included), in the client's prices
                         (see `distill.generate.budget`); it needs a price, or nothing would count against it
    """
    records = prepare(prompts, n, endpoint, template, transform)
    if max_cost is not None:
        check_max_cost(max_cost)
        if client.prices.input_per_million == 0 and client.prices.output_per_million == 0:
            raise DistillError("a cost limit needs the teacher's prices (price_input / price_output): all are 0")
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    done, earlier_cost = read_output(out_path)
    jobs, skipped = plan(records, client.model, n, params, endpoint, done, samples_per_request or n)
    summary = GenerateSummary(out_path, skipped=skipped, total_cost=earlier_cost, max_cost=max_cost)
    if done:
        reporter.event("resume", rows_in_file=len(done), skipped=skipped)
    before, started = client.usage.snapshot(), time.monotonic()

    def spent() -> float:
        return earlier_cost + client.usage.since(before).cost

    budget = None if max_cost is None else CostBudget(max_cost, spent, earlier_cost, len(done))
    reporter.stage("generate", total=sum(len(job.indices) for job in jobs))
    try:
        with out_path.open("a", encoding="utf-8") as handle:
            run = _Run(client, params, endpoint, handle, reporter, summary, max_failures, started, budget)
            await _work_all(run, jobs, concurrency or client.concurrency)
    finally:
        _close(summary, client.usage.since(before), earlier_cost, started)
        reporter.end()
    summary.budget_reached = budget is not None and budget.reached
    if summary.budget_reached:
        reporter.event("budget_reached", total_cost=summary.total_cost, not_asked=summary.not_asked)
    return summary


async def _work_all(run: _Run, jobs: list[Job], concurrency: int) -> None:
    """`concurrency` workers share the jobs; the first error stops them all."""
    shared = iter(jobs)
    await run_workers([run.work(shared) for _ in range(concurrency)])


def _close(summary: GenerateSummary, used: Usage, earlier_cost: float, started: float) -> None:
    summary.requests, summary.retries = used.requests, used.retries
    summary.prompt_tokens, summary.completion_tokens, summary.cost = (
        used.prompt_tokens,
        used.completion_tokens,
        used.cost,
    )
    summary.total_cost = earlier_cost + used.cost
    summary.elapsed = time.monotonic() - started


def generate(
    prompts: Sequence[PromptRecord | str],
    client: TeacherClient,
    out_path: Path,
    n: int = 1,
    params: RequestParams = RequestParams(),
    reporter: Reporter = NULL,
    *,
    template: str | None = None,
    transform: Callable[[PromptRecord], PromptRecord] | None = None,
    endpoint: Endpoint = "chat",
    samples_per_request: int | None = None,
    concurrency: int | None = None,
    max_failures: int = 10,
    max_cost: float | None = None,
) -> GenerateSummary:
    """`agenerate` in an event loop of its own (for synchronous callers such as the CLI); closes the client's
    connections at the end."""

    async def run() -> GenerateSummary:
        try:
            return await agenerate(
                prompts, client, out_path, n, params, reporter, template=template, transform=transform,
                endpoint=endpoint, samples_per_request=samples_per_request, concurrency=concurrency,
                max_failures=max_failures, max_cost=max_cost,
            )  # fmt: skip
        finally:
            await client.aclose()

    return run_async(run)


# ----------------------------------------------------------------------------------------------------------------
# With the settings of `distill generate`
# ----------------------------------------------------------------------------------------------------------------


def client_with(options: GenerateOptions, base_url: str, model: str, api_key: str | None) -> TeacherClient:
    """The teacher's client as `options` set it (concurrency, timeout, retries, prices)."""
    return TeacherClient(
        base_url,
        model,
        api_key=api_key,
        concurrency=options.concurrency,
        timeout=options.timeout,
        max_retries=options.max_retries,
        prices=Prices(input_per_million=options.price_input, output_per_million=options.price_output),
    )


def params_with(options: GenerateOptions) -> RequestParams:
    """The sampling parameters of `options`."""
    return RequestParams(
        temperature=options.temperature, top_p=options.top_p, max_tokens=options.max_tokens,
        stop=tuple(options.stop), seed=options.seed, top_logprobs=options.top_logprobs,
    )  # fmt: skip


def template_with(options: GenerateOptions) -> str | None:
    """The prompt template of `options`: its own, else `--cot`'s, else none."""
    from distill.generate.cot import DEFAULT_COT_TEMPLATE

    return options.template or (DEFAULT_COT_TEMPLATE if options.cot else None)


def generate_with(
    options: GenerateOptions,
    prompts: Sequence[PromptRecord | str],
    base_url: str,
    model: str,
    api_key: str | None,
    out_path: Path,
    reporter: Reporter = NULL,
) -> GenerateSummary:
    """`generate` with the settings of `distill generate` (its options, or a service's generate job): the client,
    the sampling parameters and the prompt template (`--cot`'s unless a template is given) all from `options`;
    `options.max_cost` limits what the output file may cost."""
    client = client_with(options, base_url, model, api_key)
    return generate(
        prompts, client, out_path, options.n, params_with(options), reporter, template=template_with(options),
        endpoint=options.endpoint, max_cost=options.max_cost,
    )  # fmt: skip
