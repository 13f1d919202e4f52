"""`distill cache ...` (teacher log-prob caches) and `distill train-lm` (language-model students)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import typer

from distill import config as cfg
from distill.cli.app import (
    RichReporter,
    app,
    checked_options,
    err,
    given,
    option_help,
    out,
    output_dir,
    store_dir,
    without,
)
from distill.errors import DistillError

cache_app = typer.Typer(help="Teacher log-prob caches for language models: score the data once, train many students.")
app.add_typer(cache_app, name="cache")
BUILD = cfg.CacheBuildOptions
SERVED = cfg.ServedCacheOptions
TOP_K_HELP = (
    f"Log-probs kept per token (default: {BUILD.model_fields['top_k'].default} from --teacher, about 300 bytes a "
    f"token at 128; {SERVED.model_fields['top_k'].default} from --base-url, where the cache keeps min(k, what the "
    "server returns))."
)


@cache_app.command("build")
def cache_build(
    data: Path = typer.Option(
        ...,
        help="Training data, as train-lm reads it: JSONL (prompt/completion, messages, text or question/answer "
        "rows), .txt, parquet, Arrow, JSON, CSV, a saved dataset folder or a Hub id org/name[:config][:split].",
    ),
    directory: Path = typer.Option(..., "--out", help="The cache directory (a killed build resumes in it)."),
    teacher: Optional[str] = typer.Option(
        None, help="The teacher: a causal LM folder (save_pretrained) or a hub name; or a served one (--base-url)."
    ),
    base_url: Optional[str] = typer.Option(
        None,
        help="A served teacher instead: its OpenAI-compatible endpoint (vLLM, SGLang, distill serve), e.g. "
        "http://127.0.0.1:8000/v1; it scores the data, teacher-forced, and never loads here.",
    ),
    model: Optional[str] = typer.Option(None, help="With --base-url: the teacher model's id at that endpoint."),
    student: Optional[str] = typer.Option(
        None, help="With --base-url: the student (folder or hub name) whose tokenizer the cache is for."
    ),
    api_key_env: str = typer.Option("OPENAI_API_KEY", help="Environment variable holding the API key (if any)."),
    top_k: Optional[int] = typer.Option(None, help=TOP_K_HELP),
    temperature: Optional[float] = typer.Option(
        None, help=option_help(BUILD, "temperature", "temperature of the stored distribution (the loss must match it)")
    ),
    max_length: Optional[int] = typer.Option(
        None, help=option_help(BUILD, "max_length", "tokens per example (longer ones are cut)")
    ),
    batch_size: Optional[int] = typer.Option(None, help=option_help(BUILD, "batch_size")),
    device: Optional[str] = typer.Option(None, help=option_help(BUILD, "device")),
    precision: Optional[str] = typer.Option(None, help=option_help(BUILD, "precision")),
    concurrency: Optional[int] = typer.Option(None, help=option_help(SERVED, "concurrency")),
    timeout: Optional[float] = typer.Option(None, help=option_help(SERVED, "timeout")),
    max_retries: Optional[int] = typer.Option(None, help=option_help(SERVED, "max_retries")),
    price_input: Optional[float] = typer.Option(None, help=option_help(SERVED, "price_input")),
    price_output: Optional[float] = typer.Option(None, help=option_help(SERVED, "price_output")),
) -> None:
    """Score a data file once with a teacher LM and store its top-k next-token log-probs, sharded and checksummed.

    The teacher is a local model (--teacher) or one behind an OpenAI-compatible server (--base-url, --model,
    --student): each row's tokens are sent as the prompt and the server returns the log-probs of every one of them
    (vLLM's prompt_logprobs, or echo with logprobs), so the teacher never enters this machine's memory. The server
    must share the student's vocabulary (checked token by token); the cache keeps min(k, what the server returns)
    log-probs per token at temperature 1. A killed build resumes without asking again for what it stored."""
    local = given(temperature=temperature, batch_size=batch_size, device=device, precision=precision)
    served = given(concurrency=concurrency, timeout=timeout, max_retries=max_retries, price_input=price_input,
                   price_output=price_output)  # fmt: skip
    if (teacher is None) == (base_url is None):
        raise DistillError("give --teacher (a local teacher LM) or --base-url (a served one), not both" if teacher
                           else "give --teacher (a local teacher LM) or --base-url with --model and --student")  # fmt: skip
    common = given(top_k=top_k, max_length=max_length)
    if teacher is not None:
        wrong = sorted(given(model=model, student=student, **served))
        if wrong:
            raise DistillError(f"--{wrong[0].replace('_', '-')} applies to a served teacher (--base-url) only")
        _build_local(teacher, data, directory, checked_options(BUILD, {**common, **local}))
        return
    if local:
        hint = " (a served teacher's log-probs are at temperature 1)" if "temperature" in local else ""
        raise DistillError(f"--{sorted(local)[0].replace('_', '-')} applies to a local --teacher only{hint}")
    if model is None or student is None:
        raise DistillError("--base-url needs --model (the teacher's id there) and --student (its tokenizer)")
    options = checked_options(SERVED, {**common, **served})
    _build_served(base_url or "", model, student, os.environ.get(api_key_env) or None, data, directory, options)


def _build_local(teacher: str, data: Path, directory: Path, options: cfg.CacheBuildOptions) -> None:
    from distill import hf
    from distill.teachers.token_cache import verify_token_cache

    with RichReporter(err) as reporter:
        hf.build_lm_cache(teacher, data, directory, **options.model_dump(), store=store_dir(), reporter=reporter)
    summary = verify_token_cache(directory)
    out.print(
        f"cache {directory}: {summary['positions']:,} positions of {summary['sequences']:,} sequences, "
        f"{summary['bytes_per_position']:.1f} bytes each (k = {summary['top_k']}); checksums verified",
        soft_wrap=True,
    )


def _build_served(
    base_url: str,
    model: str,
    student: str,
    api_key: str | None,
    data: Path,
    directory: Path,
    options: cfg.ServedCacheOptions,
) -> None:
    from distill import hf
    from distill.teachers.served_cache import build_served_cache_with
    from distill.teachers.token_cache import verify_token_cache

    with RichReporter(err) as reporter:
        tokenizer = hf.load_tokenizer(student, store_dir())
        built = build_served_cache_with(options, base_url.rstrip("/"), model, api_key, data, tokenizer, directory,
                                        reporter)  # fmt: skip
    summary = verify_token_cache(directory)
    asked = (
        f"{built.rows_asked:,} rows scored with {built.scoring} ({built.requests:,} requests, {built.retries:,} "
        f"retries, {built.prompt_tokens:,} prompt and {built.completion_tokens:,} completion tokens, cost "
        f"{built.cost:.4f}; {built.tokens_checked:,} token texts checked against the student's tokenizer)"
        if built.requests
        else "finished before: nothing asked"
    )
    out.print(
        f"cache {directory}: {summary['positions']:,} positions of {summary['sequences']:,} sequences, "
        f"{summary['bytes_per_position']:.1f} bytes each; k = {built.top_k} of the {built.top_k_requested} asked "
        f"(what {model} at {base_url} returns); {asked}; checksums verified",
        soft_wrap=True,
    )


@cache_app.command("from-generated")
def cache_from_generated(
    generated: Path = typer.Argument(..., help="JSONL written by `distill generate --top-logprobs K`."),
    student: str = typer.Option(..., help="The student (a causal LM folder or hub name) whose tokenizer is used."),
    directory: Path = typer.Option(..., "--out", help="The cache directory (new or empty)."),
    max_length: int = typer.Option(512, help="Tokens per example, as train-lm's max_length."),
) -> None:
    """Store a teacher API's top log-probs (kept by `distill generate`) as a token cache for `distill train-lm`.

    The student must share the teacher's tokenizer: the teacher's tokens are matched with the student's
    tokenization of the same text, and positions that do not line up are trained on as text only. Train with
    --set data=GENERATED --set cache=OUT --set loss.temperature=1.0 (API log-probs are at temperature 1)."""
    from distill import hf
    from distill.teachers.api_logprobs import cache_from_generated as build

    with RichReporter(err) as reporter:
        tokenizer = hf.load_tokenizer(student, store_dir())
        summary = build(generated, tokenizer, directory, max_length=max_length, reporter=reporter)
    out.print(
        f"cache {directory}: {summary.positions:,} teacher distributions over {summary.completion_positions:,} "
        f"completion tokens ({100 * summary.coverage:.1f} %); {summary.rows_aligned:,} of "
        f"{summary.rows_with_logprobs:,} rows line up in full; {summary.alternatives_mapped:,} of "
        f"{summary.alternatives:,} alternatives mapped to the student's ids; k = {summary.top_k}"
    )


@cache_app.command("verify")
def cache_verify(directory: Path = typer.Argument(..., help="A cache directory.")) -> None:
    """Check every shard's sha256 and the index against the manifest."""
    from distill.teachers.token_cache import verify_token_cache

    summary = verify_token_cache(directory)
    out.print_json(json.dumps(summary, default=str))


@app.command("train-lm")
def train_lm(
    config: Path = typer.Option(..., "--config", "-c", help="YAML: student, teacher or cache, data, loss, train."),
    set_: list[str] = typer.Option([], "--set", help="Override a config key, e.g. --set loss.lmbda=0.5."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Output directory (default runs/lm-<time>)."),
    resume: bool = typer.Option(False, help="Continue a killed run from its checkpoint."),
) -> None:
    """Distill a causal LM: from a live teacher, or from a log-prob cache; runs under torchrun (DDP) as it is."""
    from distill.cli.tracking import tracked
    from distill.distributed import rank
    from distill.stages import RunContext
    from distill.train_lm import LMJobConfig, run_train_lm

    job = cfg.load(LMJobConfig, config, list(set_))
    directory = output_dir(output, "lm", resume)
    first = rank() == 0
    with RichReporter(err, enabled=first) as bars, tracked(bars, job, directory, "train-lm", resume, first) as reporter:
        metrics = run_train_lm(job, RunContext(directory, resume, reporter, store_dir()))
        reporter.finish(metrics)
    if first:
        out.print_json(json.dumps(without(metrics, "history"), default=str))
