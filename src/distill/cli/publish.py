"""`distill push`: a run's student, with its model card, uploaded to a Hugging Face Hub repository."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import typer

from distill.cli.app import app, out
from distill.errors import DistillError


@app.command()
def push(
    run_dir: Path = typer.Argument(..., help="A run directory (distill run, train, train-lm)."),
    repo: str = typer.Option(..., help="The model repository, e.g. my-org/my-student (created if missing)."),
    folder: Optional[str] = typer.Option(None, help="The student folder inside the run (default: its student/)."),
    token_env: str = typer.Option("HF_TOKEN", help="Environment variable holding the Hub token."),
    endpoint: Optional[str] = typer.Option(None, help="Another Hub endpoint (a private Hub, a mirror)."),
    private: bool = typer.Option(False, help="Create the repository private."),
) -> None:
    """Upload a run's student (weights, tokenizer and its model card: the run's report, loss, data and config) to a
    Hugging Face Hub repository."""
    from distill.hub import push as upload
    from distill.hub import student_of

    if not run_dir.is_dir():
        raise DistillError(f"{run_dir} is not a run directory")
    token = os.environ.get(token_env) or None
    if token is None and endpoint is None:
        raise DistillError(f"no Hub token in ${token_env}: set it (or --token-env NAME)")
    student = student_of(run_dir, folder)
    url = upload(student, repo, token=token, endpoint=endpoint, private=private)
    out.print(f"pushed {student} to {repo}: {url}", soft_wrap=True)
