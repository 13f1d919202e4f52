"""`distill cache ...` (teacher log-prob caches) and `distill train-lm` (language-model students)."""

from __future__ import annotations

import json
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

cache_app = typer.Typer(help="Teacher log-prob caches for language models: score the data once, train many students.")
app.add_typer(cache_app, name="cache")
BUILD = cfg.CacheBuildOptions


@cache_app.command("build")
def cache_build(
    teacher: str = typer.Option(..., help="The teacher: a causal LM folder (save_pretrained) or a hub name."),
    data: Path = typer.Option(..., help="JSONL: prompt/completion, messages, text or question/answer rows."),
    directory: Path = typer.Option(..., "--out", help="The cache directory (a killed build resumes in it)."),
    top_k: Optional[int] = typer.Option(
        None, help=option_help(BUILD, "top_k", "log-probs kept per token (about 300 bytes a token at 128)")
    ),
    temperature: Optional[float] = typer.Option(
        None, help=option_help(BUILD, "temperature", "temperature of the stored distribution (the loss must match it)")
    ),
    max_length: Optional[int] = typer.Option(
        None, help=option_help(BUILD, "max_length", "tokens per example (longer ones are cut)")
    ),
    batch_size: Optional[int] = typer.Option(None, help=option_help(BUILD, "batch_size")),
) -> None:
    """Score a data file once with a teacher LM and store its top-k next-token log-probs, sharded and checksummed."""
    from distill import hf
    from distill.teachers.token_cache import verify_token_cache

    options = checked_options(BUILD, given(top_k=top_k, temperature=temperature, max_length=max_length,
                                           batch_size=batch_size))  # fmt: skip
    with RichReporter(err) as reporter:
        hf.build_lm_cache(teacher, data, directory, **options.model_dump(), store=store_dir(), reporter=reporter)
    summary = verify_token_cache(directory)
    out.print(
        f"cache {directory}: {summary['positions']:,} positions of {summary['sequences']:,} sequences, "
        f"{summary['bytes_per_position']:.1f} bytes each (k = {summary['top_k']}); checksums verified"
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
    from distill.distributed import rank
    from distill.stages import RunContext
    from distill.train_lm import LMJobConfig, run_train_lm

    job = cfg.load(LMJobConfig, config, list(set_))
    directory = output_dir(output, "lm", resume)
    first = rank() == 0
    with RichReporter(err, enabled=first) as reporter:
        metrics = run_train_lm(job, RunContext(directory, resume, reporter, store_dir()))
    if first:
        out.print_json(json.dumps(without(metrics, "history"), default=str))
