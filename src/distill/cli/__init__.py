"""The `distill` command line: `app.py` holds the app, its consoles and what the commands share; each command group
has a module of its own (`run.py`: run, train, report; `lm.py`: cache, train-lm; `text.py`: serve, generate,
traces; `evaluate.py`: eval-lm; `publish.py`: push; `service.py`: service, keys, worker), imported here so that each registers its commands on the app.

Each command parses its options into a config and makes one library call. Errors a user can fix (DistillError,
bad option values) print one line, `error: ...`, and exit with status 2; an interrupted run says how to resume it.
Nothing here imports torch before a command that needs it runs: `distill --help` and `distill service keys
create` start at once.
"""

from __future__ import annotations

import os
import sys

import typer

from distill.cli.app import app, err
from distill.errors import DistillError

# Each command module registers its commands on `app`, in the order `distill --help` lists them.
# isort: off
from distill.cli import run  # noqa: E402, F401
from distill.cli import lm  # noqa: E402, F401
from distill.cli import text  # noqa: E402, F401
from distill.cli import evaluate  # noqa: E402, F401
from distill.cli import publish  # noqa: E402, F401

# isort: on

try:  # `distill service` and `distill worker` need the [service] extra
    from distill.cli import service  # noqa: F401
except ModuleNotFoundError as missing:  # pragma: no cover - only without the [service] extra
    if missing.name not in ("fastapi", "sqlalchemy", "uvicorn", "httpx", "starlette"):
        raise

try:  # typer vendors click from 0.20 on
    from typer._click.exceptions import ClickException, UsageError
except ImportError:  # pragma: no cover - older typer with click
    from click.exceptions import ClickException, UsageError  # type: ignore[assignment]


def _usage_error(error: UsageError) -> None:
    command = error.ctx.command_path if error.ctx is not None else "distill"
    if type(error).__name__ == "NoArgsIsHelpError":
        err.print(error.ctx.get_help() if error.ctx is not None else "")
        sys.exit(2)
    message = error.format_message().splitlines()[0]
    err.print(f"[red]error:[/red] {message} (see: {command} --help)", highlight=False, soft_wrap=True)
    sys.exit(2)


def main() -> None:
    """Entry point: run the app (under torchrun, in its process group), turning user errors into one line and a
    non-zero exit."""
    torchrun = int(os.environ.get("WORLD_SIZE", "1")) > 1  # torch is imported only where it is needed
    try:
        if torchrun:
            from distill import distributed

            distributed.join_torchrun()
        app(standalone_mode=False)
        if torchrun:
            distributed.leave()
    except DistillError as error:
        err.print(f"[red]error:[/red] {error}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except UsageError as error:
        _usage_error(error)
    except ClickException as error:
        err.print(f"[red]error:[/red] {error.format_message()}", highlight=False, soft_wrap=True)
        sys.exit(error.exit_code)
    except typer.Exit as done:
        sys.exit(done.exit_code)
    except typer.Abort:
        err.print("aborted")
        sys.exit(130)
    except KeyboardInterrupt:
        err.print("interrupted: run the same command with --resume to continue from the last checkpoint")
        sys.exit(130)
