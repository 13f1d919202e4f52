"""The `distill` command's app and consoles, the progress reporter it shows, and what every command module shares:
where runs write, where the store is, option values checked by a config model, help taken from a config model."""

from __future__ import annotations

import os
import sys
from datetime import datetime
from pathlib import Path
from typing import Any, Optional

import typer
from pydantic import BaseModel, ValidationError
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from distill import config as cfg
from distill.errors import DistillError

app = typer.Typer(
    help="Knowledge distillation that proves what was kept and what was saved.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
out = Console(width=None if sys.stdout.isatty() else 120)
err = Console(stderr=True, width=None if sys.stderr.isatty() else 120)


class RichReporter:
    """Draws one progress bar per stage on stderr; epoch results appear on the bar."""

    def __init__(self, console: Console, enabled: bool = True):
        self.progress = Progress(
            SpinnerColumn(),
            TextColumn("[bold]{task.description:<24}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            TextColumn("{task.fields[info]}"),
            console=console,
            disable=not enabled,
        )
        self.task: Any = None
        self.info: dict[str, str] = {}

    def __enter__(self) -> RichReporter:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def stage(self, name: str, total: int | None = None) -> None:
        self.end()
        self.info = {}
        self.task = self.progress.add_task(name, total=total, info="")

    def advance(self, steps: int = 1, **metrics: float) -> None:
        if self.task is None:
            return
        if "loss" in metrics:
            self.info["loss"] = f"loss {metrics['loss']:.4f}"
        self.progress.update(self.task, advance=steps, info="  ".join(self.info.values()))

    def event(self, kind: str, **data: Any) -> None:
        if kind == "epoch" and self.task is not None and "test_accuracy" in data:
            self.info["acc"] = f"test acc {100 * data['test_accuracy']:.1f} %"
            self.progress.update(self.task, info="  ".join(self.info.values()))

    def end(self) -> None:
        if self.task is not None:
            task = self.progress.tasks[-1]
            if task.total is None:
                self.progress.update(self.task, total=max(task.completed, 1), completed=max(task.completed, 1))
            self.progress.stop_task(self.task)
            self.task = None

    def cancelled(self) -> bool:
        return False


# ----------------------------------------------------------------------------------------------------------------
# Shared by the command modules
# ----------------------------------------------------------------------------------------------------------------


def store_dir() -> Path:
    """Where generated data sets and extracted or fine-tuned models are kept between runs: $DISTILL_CACHE, else
    ~/.cache/distill (regenerable, so under the user's cache directory)."""
    if os.environ.get("DISTILL_CACHE"):
        return Path(os.environ["DISTILL_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "distill"


def output_dir(output: Optional[Path], prefix: str, resume: bool) -> Path:
    """`--output`, or runs/<prefix>-<timestamp>; with --resume and no --output, the newest runs/<prefix>-*."""
    if output is not None:
        if resume and not output.exists():
            raise DistillError(f"cannot resume: {output} does not exist")
        return output
    if resume:
        previous = sorted(Path("runs").glob(f"{prefix}-*"))
        if not previous:
            raise DistillError(f"cannot resume: no earlier run in runs/{prefix}-*; pass --output DIR")
        return previous[-1]
    return Path("runs") / f"{prefix}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"


def checked_options(model: type[cfg.C], values: dict[str, Any]) -> cfg.C:
    """Command-line options validated by a config model (the bounds the service's jobs have too); a DistillError
    naming the first bad option, e.g. `--top-k: Input should be less than or equal to 4096`."""
    try:
        return model.model_validate(values)
    except ValidationError as error:
        first = error.errors()[0]
        option = "--" + str(first["loc"][0]).replace("_", "-") if first["loc"] else "options"
        raise DistillError(f"{option}: {first['msg']}") from None


def option_help(model: type[BaseModel], name: str, text: str | None = None) -> str:
    """The help of the option for `model`'s field `name`: `text` (else the field's description) and the field's
    default, as the model states them: the default lives in the model only."""
    field = model.model_fields[name]
    described = text or (field.description or name.replace("_", " "))
    default = field.get_default(call_default_factory=True)
    shown = "" if default is None or default == [] else f" (default: {default})"
    return f"{described[0].upper()}{described[1:]}{shown}."


def given(**options: Any) -> dict[str, Any]:
    """The options given on the command line (a None is an option left out: the model's default applies)."""
    return {name: value for name, value in options.items() if value is not None and value != []}


def without(data: dict[str, Any], *keys: str) -> dict[str, Any]:
    return {k: v for k, v in data.items() if k not in keys}


def default_data_dir() -> Path | None:
    """The reference data sets: ../shared/data from here or from the repository, when present."""
    repository = Path(__file__).resolve().parents[3]
    for candidate in (Path("../shared/data"), Path("shared/data"), repository.parent / "shared" / "data"):
        if candidate.is_dir():
            return candidate.resolve()
    return None
