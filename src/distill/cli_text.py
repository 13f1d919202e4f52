"""`distill serve`, `distill generate` and `distill traces`: the black-box side of the command line.

Registered on the main app by `distill.cli`; like every command, each one parses its options and makes one library
call. The teacher API key is read here, from the environment variable named by `--api-key-env`, never from a file.
Every number an option takes is bounded (and a float must be finite), with the bounds of `distill.config` where it
has one: a value out of range ends the command with one line `error: Invalid value for '--option': ...` and exit
status 2, through `distill.cli.main`.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import typer

from distill import config as cfg
from distill.cli import RichReporter, app, err, out
from distill.errors import DistillError

LOOPBACK = ("127.0.0.1", "localhost", "::1")
MiB = 1024 * 1024


def between(low: float, high: float, *, above: bool = False) -> Callable[[Optional[float]], Optional[float]]:
    """A typer callback that refuses a float that is not finite or lies outside [low, high] ((low, high] with
    `above`); click's own ranges let NaN through."""

    def check(value: Optional[float]) -> Optional[float]:
        inside = value is not None and (low < value if above else low <= value) and value <= high
        if value is not None and not (math.isfinite(value) and inside):
            raise typer.BadParameter(f"{value} is not a number in {'(' if above else '['}{low:g}, {high:g}]")
        return value

    return check


@app.command()
def serve(
    model: Path = typer.Option(..., "--model", "-m", help="A causal LM folder (save_pretrained layout + tokenizer)."),
    host: str = typer.Option("127.0.0.1", help="Address to listen on (loopback by default)."),
    port: int = typer.Option(8000, min=1, max=65535, help="Port to listen on."),
    name: Optional[str] = typer.Option(None, help="Model id clients ask for (default: the folder's name)."),
    device: str = typer.Option("cpu", help="cpu, cuda, cuda:N or mps."),
    max_batch_size: int = typer.Option(
        16, min=1, max=4096, help="Sequences generated together when requests arrive at once."
    ),
    batch_wait_ms: float = typer.Option(
        5.0, callback=between(0, 10_000), help="How long a request waits for others to share its batch."
    ),
    max_body_mb: Optional[int] = typer.Option(None, min=1, max=1024, help="Largest request body in MiB (default: 4)."),
    max_prompts: Optional[int] = typer.Option(
        None, min=1, max=1_000_000, help="Prompts per completions request at most (default: 256)."
    ),
    max_n: Optional[int] = typer.Option(
        None, min=1, max=1_000_000, help="Choices (n) per prompt at most (default: 128)."
    ),
    max_tokens: Optional[int] = typer.Option(
        None, min=1, max=1_000_000, help="Tokens generated per choice at most (default: 4096)."
    ),
    max_sequences: Optional[int] = typer.Option(
        None, min=1, max=1_000_000, help="Prompts x n per request at most (default: 512)."
    ),
) -> None:
    """Serve a local model behind an OpenAI-compatible API: /v1/models, /v1/chat/completions, /v1/completions.

    Any OpenAI client (or `distill generate`) can then use it as a teacher, or query a distilled student.
    This server has no API keys: keep it on loopback, or behind `distill service` which has them. A request over
    a limit gets a 400 (413 for the body) in OpenAI's error shape; a client that disconnects stops its generation.
    """
    from distill.serve import ServeLimits
    from distill.serve import serve as run_server

    if not model.is_dir():
        raise DistillError(f"{model} is not a model folder")
    if name is not None and not name.strip():
        raise DistillError("--name must not be empty")
    given = {"max_prompts": max_prompts, "max_n": max_n, "max_tokens": max_tokens, "max_sequences": max_sequences}
    given["max_body_bytes"] = max_body_mb * MiB if max_body_mb is not None else None
    limits = ServeLimits(**{key: value for key, value in given.items() if value is not None})
    if host not in LOOPBACK:
        err.print(f"warning: serving on {host} without authentication; anyone who reaches it can use the model")
    run_server(
        model, host, port, model_name=name, device=device, max_batch_size=max_batch_size,
        batch_wait_ms=batch_wait_ms, limits=limits,
    )  # fmt: skip


@app.command()
def generate(
    prompts: Path = typer.Option(
        ..., "--prompts", "-p", help="JSONL (prompt, messages or GSM8K question/answer) or .txt."
    ),
    output: Path = typer.Option(..., "--output", "-o", help="JSONL of answers; rerunning resumes it."),
    base_url: str = typer.Option("http://127.0.0.1:8000/v1", help="The teacher's OpenAI-compatible endpoint."),
    model: str = typer.Option(..., help="The teacher model's id at that endpoint."),
    api_key_env: str = typer.Option("OPENAI_API_KEY", help="Environment variable holding the API key (if any)."),
    n: int = typer.Option(1, min=1, max=128, help="Samples per prompt."),
    temperature: float = typer.Option(1.0, callback=between(0, 2), help="Sampling temperature (0 = greedy)."),
    top_p: float = typer.Option(1.0, callback=between(0, 1, above=True), help="Nucleus sampling mass."),
    max_tokens: Optional[int] = typer.Option(None, min=1, max=cfg.MAX_LENGTH, help="Tokens per answer at most."),
    stop: list[str] = typer.Option([], help="Stop string (repeatable)."),
    seed: Optional[int] = typer.Option(
        None, min=0, max=cfg.MAX_SEED, help="Seed sent to the server (sample i uses seed + i)."
    ),
    top_logprobs: Optional[int] = typer.Option(
        None,
        min=0,
        max=20,
        help="Keep the sampled tokens' log-probs (0) and the top K alternatives (K > 0), when served.",
    ),
    cot: bool = typer.Option(False, "--cot", help="Ask for step-by-step reasoning ending in '#### <answer>'."),
    template: Optional[str] = typer.Option(None, help="A prompt template with {question} (overrides --cot's)."),
    endpoint: str = typer.Option("chat", help="chat (messages) or completions (raw prompt)."),
    concurrency: int = typer.Option(16, min=1, max=cfg.MAX_WORKERS, help="Requests in flight at most."),
    timeout: float = typer.Option(
        120.0, callback=between(0, 3600, above=True), help="Seconds a response may take before it is retried."
    ),
    max_retries: int = typer.Option(
        6, min=0, max=20, help="Retries per request (429, 5xx, timeouts, malformed answers)."
    ),
    price_input: float = typer.Option(
        0.0, callback=between(0, 1e6), help="Price per million prompt tokens, for the cost figure."
    ),
    price_output: float = typer.Option(
        0.0, callback=between(0, 1e6), help="Price per million completion tokens, for the cost figure."
    ),
    limit: Optional[int] = typer.Option(None, min=0, max=cfg.MAX_ROWS, help="Only the first N prompts."),
) -> None:
    """Ask a teacher behind an OpenAI-compatible API for answers and keep them as training data.

    Every answer is appended as soon as it arrives, under an id that hashes the prompt, model, sampling settings
    and sample index: a killed run, run again, asks only for what is missing. With --cot, follow with
    `distill traces` to keep only the traces whose final answer verifies.
    """
    from distill.generate.cot import DEFAULT_COT_TEMPLATE
    from distill.generate.sample import SamplingParams, read_prompts
    from distill.generate.sample import generate as run_generate
    from distill.teachers.api import ApiTeacher, Prices

    if endpoint not in ("chat", "completions"):
        raise DistillError(f"--endpoint must be chat or completions, got {endpoint!r}")
    client = ApiTeacher(
        base_url.rstrip("/"),
        model,
        api_key=os.environ.get(api_key_env) or None,
        concurrency=concurrency,
        timeout=timeout,
        max_retries=max_retries,
        prices=Prices(input_per_million=price_input, output_per_million=price_output),
    )
    params = SamplingParams(
        temperature=temperature, top_p=top_p, max_tokens=max_tokens, stop=tuple(stop), seed=seed,
        top_logprobs=top_logprobs,
    )  # fmt: skip
    records = read_prompts(prompts, limit=limit)
    with RichReporter(err) as reporter:
        summary = run_generate(
            records, client, output, n, params, reporter,
            template=template or (DEFAULT_COT_TEMPLATE if cot else None), endpoint=endpoint,  # type: ignore[arg-type]
        )  # fmt: skip
    out.print_json(json.dumps({**asdict(summary), "rate": summary.rate}, default=str))


@app.command()
def traces(
    generated: Path = typer.Argument(..., help="The JSONL written by `distill generate --cot`."),
    output: Path = typer.Option(..., "--output", "-o", help="Folder for verified.jsonl, rejected.jsonl, summary.json."),
    mode: str = typer.Option("auto", help="How answers compare: auto, exact, numeric or choice."),
    max_per_question: Optional[int] = typer.Option(
        None, min=1, max=cfg.MAX_ROWS, help="Verified traces kept per question at most."
    ),
    dedupe: bool = typer.Option(True, help="Drop verified traces identical to one already kept."),
) -> None:
    """Verify reasoning traces: extract each final answer (#### x, \\boxed{x}, Answer: x), compare it with the gold
    answer, and split the traces into a training set and a rejected set with the reason for each."""
    from distill.generate.cot import read_traces, split_traces, write_split

    verified, rejected, summary = split_traces(
        read_traces(generated), mode, max_per_question=max_per_question, dedupe=dedupe
    )
    write_split(verified, rejected, output, summary)
    out.print_json(json.dumps(summary, default=str))
