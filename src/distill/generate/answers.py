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

Accepted prompt rows (JSONL, one object per line; or a .txt file with one prompt per line):

    {"prompt": "...", "gold"?: ...}            sent as a user message (or as is to /completions)
    {"question": "...", "answer": "..."}       GSM8K: the question is the prompt, the answer is kept as gold
    {"messages": [{"role", "content"}, ...]}   a conversation; a last assistant message is dropped (the teacher
                                               writes that turn)
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Literal

from distill.config import GenerateOptions
from distill.data import json_lines, read_text
from distill.errors import DataError, DistillError
from distill.generate.client import Completion, TeacherClient, TeacherClientError
from distill.progress import NULL, Cancelled, Reporter

Endpoint = Literal["chat", "completions"]


@dataclass(frozen=True)
class RequestParams:
    """How the teacher samples. `top_logprobs`: None keeps no log-probs, 0 the sampled tokens', K > 0 also the top K.
    With a `seed`, a request for samples i.. uses seed + i, so samples asked one per request differ."""

    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int | None = None
    stop: tuple[str, ...] = ()
    seed: int | None = None
    top_logprobs: int | None = None


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


@dataclass
class GenerateSummary:
    """What a `generate` run did: samples `written`, `skipped` (already in the file, or a repeated prompt),
    `failed` (their request gave up; a rerun asks again), the teacher's usage and the time it took."""

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

    @property
    def rate(self) -> float:
        """Samples written per second."""
        return self.written / self.elapsed if self.elapsed > 0 else 0.0


# ----------------------------------------------------------------------------------------------------------------
# Prompts in
# ----------------------------------------------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------------------------------------------
# Ids and the output file
# ----------------------------------------------------------------------------------------------------------------


def sample_id(record: PromptRecord, model: str, params: RequestParams, endpoint: Endpoint, index: int) -> str:
    """The content hash that names one sample."""
    key = {
        "prompt": record.prompt,
        "messages": None if record.messages is None else [list(m) for m in record.messages],
        "model": model,
        "endpoint": endpoint,
        "params": asdict(params),
        "sample": index,
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def read_done(path: Path) -> set[str]:
    """The ids already in an output file. A last line without its newline (cut off by a kill mid-write) is removed
    from the file, so its sample is asked again; any other unreadable line is an error."""
    done: set[str] = set()
    if not path.exists():
        return done
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
                done.add(str(json.loads(line)["id"]))
            except (ValueError, KeyError, TypeError, RecursionError):
                raise DataError(f"line {number} of {path} is not a sample row; fix or remove the file") from None
    if keep < size:
        with path.open("r+b") as handle:
            handle.truncate(keep)
    return done


def _row(record: PromptRecord, sample: str, index: int, completion: Completion, model: str) -> dict[str, Any]:
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


# ----------------------------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class _Job:
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
    failed_requests: int = 0

    async def work(self, jobs: Iterator[_Job]) -> None:
        for job in jobs:
            if self.reporter.cancelled():
                raise Cancelled("generation cancelled; rerun to resume")
            await self.one(job)

    async def one(self, job: _Job) -> None:
        p, model = self.params, self.client.model
        seed = None if p.seed is None else p.seed + job.indices[0]
        options: dict[str, Any] = {
            "n": len(job.indices),
            "temperature": p.temperature,
            "top_p": p.top_p,
            "max_tokens": p.max_tokens,
            "stop": list(p.stop) or None,
            "seed": seed,
            "top_logprobs": p.top_logprobs,
        }
        try:
            if self.endpoint == "completions":
                completions = await self.client.complete(job.record.text, **options)
            else:
                completions = await self.client.chat(_messages(job.record), **options)
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
            return
        for index, sample, completion in zip(job.indices, job.ids, completions):
            self.handle.write(json.dumps(_row(job.record, sample, index, completion, model), ensure_ascii=False) + "\n")
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


def _messages(record: PromptRecord) -> list[dict[str, str]]:
    if record.messages is not None:
        return [{"role": role, "content": content} for role, content in record.messages]
    return [{"role": "user", "content": record.prompt or ""}]


def plan(
    prompts: Sequence[PromptRecord],
    model: str,
    n: int,
    params: RequestParams,
    endpoint: Endpoint,
    done: set[str],
    samples_per_request: int,
) -> tuple[list[_Job], int]:
    """The requests still to make and the number of samples skipped (done already or repeated)."""
    jobs: list[_Job] = []
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
            jobs.append(_Job(record, [i for i, _ in chunk], [s for _, s in chunk]))
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
) -> GenerateSummary:
    """Ask `client` for `n` samples of every prompt and append them to `out_path` (see the module docstring).

    template:            a template with `{question}` applied to each prompt (before `transform`), see `apply_template`
    transform:           any rewrite of each prompt record (a CoT prompt, a system message)
    endpoint:            "chat" (a plain prompt becomes one user message) or "completions" (the raw prompt)
    samples_per_request: samples asked per request (n by default; 1 for servers without n > 1)
    concurrency:         requests in flight (the client's limit by default)
    max_failures:        requests that may give up (their samples are left for a rerun) before the run stops
    """
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
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    done = read_done(out_path)
    jobs, skipped = plan(records, client.model, n, params, endpoint, done, samples_per_request or n)
    summary = GenerateSummary(out_path, skipped=skipped)
    if done:
        reporter.event("resume", rows_in_file=len(done), skipped=skipped)
    before, started = client.usage.snapshot(), time.monotonic()
    reporter.stage("generate", total=sum(len(job.indices) for job in jobs))
    try:
        with out_path.open("a", encoding="utf-8") as handle:
            run = _Run(client, params, endpoint, handle, reporter, summary, max_failures, started)
            shared = iter(jobs)
            workers = [asyncio.ensure_future(run.work(shared)) for _ in range(concurrency or client.concurrency)]
            try:
                await asyncio.gather(*workers)
            finally:
                for worker in workers:
                    worker.cancel()
                await asyncio.gather(*workers, return_exceptions=True)
    finally:
        used = client.usage.since(before)
        summary.requests, summary.retries = used.requests, used.retries
        summary.prompt_tokens, summary.completion_tokens, summary.cost = (
            used.prompt_tokens,
            used.completion_tokens,
            used.cost,
        )
        summary.elapsed = time.monotonic() - started
        reporter.end()
    return summary


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
) -> GenerateSummary:
    """`agenerate` in an event loop of its own (for synchronous callers such as the CLI); closes the client's
    connections at the end."""

    async def run() -> GenerateSummary:
        try:
            return await agenerate(
                prompts,
                client,
                out_path,
                n,
                params,
                reporter,
                template=template,
                transform=transform,
                endpoint=endpoint,
                samples_per_request=samples_per_request,
                concurrency=concurrency,
                max_failures=max_failures,
            )
        finally:
            await client.aclose()

    try:  # uvloop (uvicorn[standard], extra `service`) when installed: less client CPU per request
        import uvloop
    except ImportError:
        return asyncio.run(run())
    return uvloop.run(run())


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
    the sampling parameters and the prompt template (`--cot`'s unless a template is given) all from `options`."""
    from distill.generate.client import Prices
    from distill.generate.cot import DEFAULT_COT_TEMPLATE

    client = TeacherClient(
        base_url,
        model,
        api_key=api_key,
        concurrency=options.concurrency,
        timeout=options.timeout,
        max_retries=options.max_retries,
        prices=Prices(input_per_million=options.price_input, output_per_million=options.price_output),
    )
    params = RequestParams(
        temperature=options.temperature, top_p=options.top_p, max_tokens=options.max_tokens,
        stop=tuple(options.stop), seed=options.seed, top_logprobs=options.top_logprobs,
    )  # fmt: skip
    template = options.template or (DEFAULT_COT_TEMPLATE if options.cot else None)
    return generate(
        prompts, client, out_path, options.n, params, reporter, template=template, endpoint=options.endpoint
    )
