"""`distill serve`, `distill generate` and `distill traces`: the black-box side of the command line.

like every command, each one parses its options and makes one library
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
from typing import Any, Optional

import typer

from distill import config as cfg
from distill.cli.app import RichReporter, app, checked_options, err, given, option_help, out
from distill.errors import DistillError

GEN = cfg.GenerateOptions


LOOPBACK = ("127.0.0.1", "localhost", "::1")
CASCADE_HELP = {
    "target": "Cascade, --validation: agreement with the teacher to keep (gold answers: share of its accuracy); 0.95.",
    "assurance": "Cascade, --validation: confidence that the threshold keeps --target beyond the validation rows "
    "(a lower bound at this level must reach it; 0.5: the point estimate); 0.95.",
    "answers": "Cascade: text (whole answers compared, default) or final (final answers, '#### 42').",
    "verify": "Cascade, --answers final: an answer without a well-formed last line '#### N' goes to the teacher.",
    "tokens": "Cascade, --validation: tokens per validation answer at most (default: 256).",
}
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
    teacher_url: Optional[str] = typer.Option(None, help="A cascade: the teacher's OpenAI-compatible endpoint."),
    teacher_model: Optional[str] = typer.Option(None, help="Cascade: the teacher's model id at --teacher-url."),
    teacher_key_env: str = typer.Option("OPENAI_API_KEY", help="Cascade: variable holding the teacher's key."),
    threshold: Optional[float] = typer.Option(None, help="Cascade: the teacher answers below this confidence."),
    validation: Optional[Path] = typer.Option(None, help="Cascade: JSONL to choose the threshold on at start-up."),
    target: Optional[float] = typer.Option(None, callback=between(0, 1, above=True), help=CASCADE_HELP["target"]),
    assurance: Optional[float] = typer.Option(None, callback=between(0, 1), help=CASCADE_HELP["assurance"]),
    confidence: Optional[str] = typer.Option(None, help="Cascade: logprob (default) or agreement (of k samples)."),
    samples: Optional[int] = typer.Option(None, min=1, max=32, help="Cascade, agreement: k (default: 5)."),
    answers: Optional[str] = typer.Option(None, help=CASCADE_HELP["answers"]),
    verify: bool = typer.Option(False, "--verify", help=CASCADE_HELP["verify"]),
    validation_max_tokens: Optional[int] = typer.Option(None, min=1, max=1_000_000, help=CASCADE_HELP["tokens"]),
) -> None:
    """Serve a local model behind an OpenAI-compatible API: /v1/models, /v1/chat/completions, /v1/completions.

    Any OpenAI client (or `distill generate`) can then use it as a teacher, or query a distilled student.
    This server has no API keys: keep it on loopback, or behind `distill service` which has them. A request over
    a limit gets a 400 (413 for the body) in OpenAI's error shape; a client that disconnects stops its generation.
    With --teacher-url it serves a cascade: the student answers when confident enough, else the teacher
    (header X-Distill-Answered-By; GET /v1/cascade shows the threshold and the counts).
    """
    from distill.cli.serve_cascade import cascade_setup
    from distill.serve import ServeLimits
    from distill.serve import serve as run_server

    cascade = cascade_setup(teacher_url, {
        "teacher_model": teacher_model, "key_env": teacher_key_env, "threshold": threshold, "validation": validation,
        "target": target, "assurance": assurance, "confidence": confidence, "samples": samples, "answers": answers, "verify": verify,
        "validation_max_tokens": validation_max_tokens,
    })  # fmt: skip

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
        batch_wait_ms=batch_wait_ms, limits=limits, cascade=cascade,
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
    n: Optional[int] = typer.Option(None, help=option_help(GEN, "n")),
    temperature: Optional[float] = typer.Option(None, help=option_help(GEN, "temperature")),
    top_p: Optional[float] = typer.Option(None, help=option_help(GEN, "top_p")),
    max_tokens: Optional[int] = typer.Option(None, help=option_help(GEN, "max_tokens")),
    stop: list[str] = typer.Option([], help=option_help(GEN, "stop", "a stop string (repeatable, up to 4)")),
    seed: Optional[int] = typer.Option(None, help=option_help(GEN, "seed")),
    top_logprobs: Optional[int] = typer.Option(None, help=option_help(GEN, "top_logprobs")),
    cot: bool = typer.Option(False, "--cot", help=option_help(GEN, "cot")),
    template: Optional[str] = typer.Option(
        None, help=option_help(GEN, "template", "a prompt template with {question} (overrides --cot's)")
    ),
    endpoint: Optional[str] = typer.Option(None, help=option_help(GEN, "endpoint")),
    concurrency: Optional[int] = typer.Option(None, help=option_help(GEN, "concurrency")),
    timeout: Optional[float] = typer.Option(None, help=option_help(GEN, "timeout")),
    max_retries: Optional[int] = typer.Option(None, help=option_help(GEN, "max_retries")),
    price_input: Optional[float] = typer.Option(None, help=option_help(GEN, "price_input")),
    price_output: Optional[float] = typer.Option(None, help=option_help(GEN, "price_output")),
    limit: Optional[int] = typer.Option(None, help=option_help(GEN, "limit")),
    estimate: bool = typer.Option(
        False, "--estimate", help="Only estimate the run: send a few prompts, print its expected tokens, cost, time."
    ),
    estimate_prompts: Optional[int] = typer.Option(
        None, help="Prompts the estimate sends, drawn at random (1 to 1000, default: 8)."
    ),
    max_cost: Optional[float] = typer.Option(None, help=option_help(GEN, "max_cost")),
) -> None:
    """Ask a teacher behind an OpenAI-compatible API for answers and keep them as training data.

    Every answer is appended as soon as it arrives, under an id that hashes the prompt, model, sampling settings
    and sample index: a killed run, run again, asks only for what is missing. With --cot, follow with
    `distill traces` to keep only the traces whose final answer verifies. The options' defaults and bounds are
    those of the service's generate jobs (`distill.config.GenerateOptions`). --estimate writes no answers; with
    --max-cost a run that reaches the budget stops cleanly (budget_reached in the summary), and a rerun with a larger
    budget continues it.
    """
    from distill.generate.answers import generate_with, read_prompts
    from distill.generate.estimate import DEFAULT_SAMPLE_PROMPTS, check_sample_prompts, estimate_with

    sample_prompts = check_sample_prompts(
        DEFAULT_SAMPLE_PROMPTS if estimate_prompts is None else estimate_prompts, "--estimate-prompts"
    )
    options = checked_options(GEN, given(
        n=n, temperature=temperature, top_p=top_p, max_tokens=max_tokens, stop=stop, seed=seed,
        top_logprobs=top_logprobs, cot=cot or None, template=template, endpoint=endpoint, concurrency=concurrency,
        timeout=timeout, max_retries=max_retries, price_input=price_input, price_output=price_output, limit=limit,
        max_cost=max_cost,
    ))  # fmt: skip
    records = read_prompts(prompts, limit=options.limit)
    key = os.environ.get(api_key_env) or None
    if estimate:
        expected = estimate_with(options, records, base_url.rstrip("/"), model, key, output, sample_prompts)
        err.print(estimate_line(expected), markup=False)
        out.print_json(json.dumps(asdict(expected)))
        return
    with RichReporter(err) as reporter:
        summary = generate_with(options, records, base_url.rstrip("/"), model, key, output, reporter)
    if summary.budget_reached:
        err.print(
            f"stopped at the cost limit: {summary.total_cost:.6g} spent of {options.max_cost:g} on {output}; "
            f"{summary.not_asked} samples not asked (rerun with a larger --max-cost to continue)",
            markup=False,
        )
    out.print_json(json.dumps({**asdict(summary), "rate": summary.rate}, default=str))


def estimate_line(expected: Any) -> str:
    """One line that says what `distill generate --estimate` expects (a `distill.generate.estimate.Estimate`)."""
    budget = ""
    if expected.max_cost is not None:
        budget = f", {'within' if expected.within_budget else 'over'} the budget of {expected.max_cost:g}"
    return (
        f"expected for {expected.samples:,} samples ({expected.requests:,} requests): {expected.tokens:,} tokens "
        f"({expected.prompt_tokens:,} prompt, {expected.completion_tokens:,} completion), cost {expected.cost:.6g}"
        f"{budget}, about {duration(expected.seconds)} at {expected.concurrency} requests in flight; still to ask: "
        f"{expected.remaining_samples:,} samples, cost {expected.remaining_cost:.6g}, {duration(expected.remaining_seconds)}"
        f" (measured on {expected.sampled_prompts} prompts, which cost {expected.sample_cost:.6g})"
    )


def duration(seconds: float) -> str:
    """`1 h 02 min`, `3 min 05 s` or `12.3 s`."""
    if seconds >= 3600:
        return f"{int(seconds // 3600)} h {int(seconds % 3600 // 60):02d} min"
    if seconds >= 60:
        return f"{int(seconds // 60)} min {int(seconds % 60):02d} s"
    return f"{seconds:.1f} s"


@app.command()
def traces(
    generated: Path = typer.Argument(..., help="The JSONL written by `distill generate --cot`."),
    output: Path = typer.Option(..., "--output", "-o", help="Folder for verified.jsonl, rejected.jsonl, summary.json."),
    mode: str = typer.Option("auto", help="How answers compare: auto, exact, numeric or choice."),
    max_per_question: Optional[int] = typer.Option(
        None, min=1, max=cfg.MAX_ROWS, help="Verified traces kept per question at most."
    ),
    dedupe: bool = typer.Option(True, help="Drop verified traces identical to one already kept."),
    judge: Optional[str] = typer.Option(
        None, help="A judge's OpenAI-compatible endpoint: it grades the traces that have no gold answer."
    ),
    model: Optional[str] = typer.Option(None, help="The judge model's id at that endpoint."),
    rubric: Optional[Path] = typer.Option(None, help="A text or markdown file: how the judge grades an answer."),
    min_score: Optional[float] = typer.Option(None, help="The judge's score (0 to 10) a trace needs (default: 7)."),
    judge_api_key_env: str = typer.Option("OPENAI_API_KEY", help="Environment variable holding the judge's API key."),
    judge_concurrency: int = typer.Option(16, min=1, max=cfg.MAX_WORKERS, help="Judge requests in flight at most."),
    judge_price_input: float = typer.Option(
        0.0, callback=between(0, 1e6), help="The judge's price per million prompt tokens, for its cost."
    ),
    judge_price_output: float = typer.Option(
        0.0, callback=between(0, 1e6), help="The judge's price per million completion tokens, for its cost."
    ),
) -> None:
    """Verify reasoning traces: extract each final answer (#### x, \\boxed{x}, Answer: x), compare it with the gold
    answer, and split the traces into a training set and a rejected set with the reason for each. With --judge, a
    trace without a gold answer is graded by a judge model with --rubric instead: kept when it scores at least
    --min-score, and both files record the judge's score and reason; the summary counts the judge's tokens and cost.
    """
    from distill.generate.cot import read_traces, split_traces, write_split

    judged = {"--model": model, "--rubric": rubric, "--min-score": min_score}
    if judge is None:
        given_alone = [name for name, value in judged.items() if value is not None]
        if given_alone:
            raise DistillError(f"{', '.join(given_alone)} only apply with --judge URL")
        verified, rejected, summary = split_traces(
            read_traces(generated), mode, max_per_question=max_per_question, dedupe=dedupe
        )
    else:
        client, text, threshold = judge_client(judge, model, rubric, min_score, judge_api_key_env, judge_concurrency,
                                               judge_price_input, judge_price_output)  # fmt: skip
        from distill.generate.cot import judge_and_split

        records = read_traces(generated)
        with RichReporter(err) as reporter:
            verified, rejected, summary = judge_and_split(records, client, text, threshold, mode, reporter,
                                                          max_per_question=max_per_question, dedupe=dedupe)  # fmt: skip
    write_split(verified, rejected, output, summary)
    out.print_json(json.dumps(summary, default=str))


def judge_client(
    url: str, model: Optional[str], rubric: Optional[Path], min_score: Optional[float], key_env: str,
    concurrency: int, price_input: float, price_output: float,
) -> tuple[Any, str, float]:  # fmt: skip
    """The judge's client, its rubric and threshold from `distill traces`' options (each checked)."""
    from distill.generate.client import Prices, TeacherClient
    from distill.generate.judge import DEFAULT_MIN_SCORE, check_min_score, read_rubric

    if model is None or rubric is None:
        raise DistillError("--judge needs --model (the judge model's id) and --rubric (a text file)")
    if not model.strip():
        raise DistillError("--model must not be empty")
    threshold = check_min_score(DEFAULT_MIN_SCORE if min_score is None else min_score, "--min-score")
    text = read_rubric(rubric)
    prices = Prices(input_per_million=price_input, output_per_million=price_output)
    client = TeacherClient(url.rstrip("/"), model, api_key=os.environ.get(key_env) or None, concurrency=concurrency,
                           prices=prices)  # fmt: skip
    return client, text, threshold
