"""The `distill` command line. Each subcommand parses its options into a config and makes one library call.

Errors a user can fix (DistillError, bad option values) print one line, `error: ...`, and exit with status 2;
an interrupted run says how to resume it.
"""

from __future__ import annotations

import json
import os
import sys
from datetime import datetime
from pathlib import Path
from typing import Any, Optional

import typer
from pydantic import ValidationError
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
from rich.table import Table

from distill import config as cfg
from distill.errors import DistillError

try:  # typer vendors click from 0.20 on
    from typer._click.exceptions import ClickException, UsageError
except ImportError:  # pragma: no cover - older typer with click
    from click.exceptions import ClickException, UsageError  # type: ignore[assignment]

app = typer.Typer(
    help="Knowledge distillation that proves what was kept and what was saved.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
out = Console(width=None if sys.stdout.isatty() else 120)
err = Console(stderr=True, width=None if sys.stderr.isatty() else 120)


# ----------------------------------------------------------------------------------------------------------------
# Progress: the rich reporter
# ----------------------------------------------------------------------------------------------------------------


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
# Helpers
# ----------------------------------------------------------------------------------------------------------------


def cache_dir() -> Path:
    """Where generated data sets and extracted models are kept between runs ($DISTILL_CACHE, else ~/.cache/distill)."""
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


def _without(data: dict[str, Any], *keys: str) -> dict[str, Any]:
    return {k: v for k, v in data.items() if k not in keys}


def print_classification(metrics: dict[str, Any], output: Path) -> None:
    """The comparison as a compact terminal table (the full one is in report.md), then the summary."""
    from distill.report import classification_summary, classification_table

    full = classification_table(metrics)
    keep = ["model", "test accuracy", "parameters", "latency ms (batch 1)", "rows/s (batch 256)", "agreement", "ECE"]
    columns = [full.header.index(name) for name in keep]
    table = Table(title=f"distill {metrics['recipe']}: {metrics.get('description', '')}", title_justify="left")
    for name in keep:
        table.add_column(
            name.replace(" (batch 1)", "").replace(" (batch 256)", ""), justify="left" if name == "model" else "right"
        )
    for row in full.rows:
        table.add_row(*[row[i] for i in columns])
    out.print(table)
    for line in classification_summary(metrics):
        out.print("• " + line.replace("**", ""))
    out.print(
        f"Wrote {output}/report.md, report.html, metrics.json and the student in {output}/student "
        f"({metrics['seconds']:.0f} s)."
    )


# ----------------------------------------------------------------------------------------------------------------
# Commands
# ----------------------------------------------------------------------------------------------------------------


# Which `distill run` options each recipe takes, and the config key each one sets.
_ARRAY_OPTIONS = {
    "teachers": "teachers",
    "ensemble": "ensemble",
    "student_width": "student_width",
    "epochs": "epochs",
    "teacher_epochs": "teacher_epochs",
    "transfer_size": "transfer_size",
    "seed": "seed",
    "temperature": "loss.temperature",
    "alpha": "loss.alpha",
    "divergence": "loss.divergence",
}
RUN_OPTIONS: dict[str, dict[str, str]] = {
    "mnist1d": _ARRAY_OPTIONS,
    "digits": _ARRAY_OPTIONS,
    "stsb": {
        "teacher": "teacher",
        "sample_size": "sample_size",
        "data_dir": "data_dir",
        "epochs": "train.epochs",
        "seed": "seed",
    },
    "sst2": {
        "teacher": "teacher",
        "sample_size": "train_size",
        "transfer_size": "transfer_size",
        "data_dir": "data_dir",
        "epochs": "student_train.epochs",
        "teacher_epochs": "teacher_train.epochs",
        "seed": "seed",
        "temperature": "loss.temperature",
        "alpha": "loss.alpha",
        "divergence": "loss.divergence",
    },
    "reasoning": {
        "sample_size": "problems",
        "epochs": "student_train.epochs",
        "teacher_epochs": "teacher_train.epochs",
        "seed": "seed",
    },
    "lm": {
        "sample_size": "sample_size",
        "data_dir": "data_dir",
        "epochs": "student_train.epochs",
        "teacher_epochs": "teacher_train.epochs",
        "seed": "seed",
        "temperature": "loss.temperature",
        "alpha": "loss.alpha",
        "divergence": "loss.divergence",
    },
}


def default_data_dir() -> Path | None:
    """The reference data sets: ../shared/data from here or from the repository, when present."""
    repository = Path(__file__).resolve().parents[2]
    for candidate in (Path("../shared/data"), Path("shared/data"), repository.parent / "shared" / "data"):
        if candidate.is_dir():
            return candidate.resolve()
    return None


def print_report_tables(metrics: dict[str, Any], output: Path) -> None:
    from distill.report_recipes import REPORTS

    rendered = REPORTS[metrics["recipe"]](metrics)
    for table_data in rendered.tables:
        table = Table(title=f"{table_data.title}: {rendered.description}", title_justify="left")
        for i, column in enumerate(table_data.header):
            table.add_column(column, justify="left" if i == 0 else "right")
        for row in table_data.rows:
            table.add_row(*row)
        out.print(table)
    for line in rendered.summary:
        out.print("• " + line.replace("**", ""))
    out.print(f"Wrote {output}/report.md, report.html and metrics.json ({metrics['seconds']:.0f} s).")


@app.command()
def run(
    recipe: Optional[str] = typer.Option(
        None,
        help="Built-in recipe: mnist1d (default, generated offline), digits, stsb or sst2 (real text data), "
        "lm (a small language model distilled through a log-prob cache), reasoning (verified chain-of-thought "
        "traces sampled from a served teacher).",
    ),
    teachers: Optional[int] = typer.Option(None, help="(mnist1d, digits) Teachers to train; several = an ensemble."),
    ensemble: Optional[str] = typer.Option(None, help="(mnist1d, digits) How an ensemble combines: mean or geometric."),
    student_width: Optional[int] = typer.Option(None, help="(mnist1d, digits) Hidden units of the student MLP."),
    teacher: Optional[str] = typer.Option(
        None, help="(stsb, sst2) Teacher: minilm-l6 (packaged all-MiniLM-L6-v2), a model folder or a hub name."
    ),
    sample_size: Optional[int] = typer.Option(
        None,
        help="(stsb) Unlabeled training sentences; (sst2) labeled training phrases; (lm) texts (0 = all); "
        "(reasoning) generated problems.",
    ),
    data_dir: Optional[Path] = typer.Option(None, help="(stsb, sst2, lm) Folder with sst2/, stsb/, agnews/."),
    temperature: Optional[float] = typer.Option(None, help="Softening temperature T of the soft targets."),
    alpha: Optional[float] = typer.Option(None, help="Weight of the soft-target loss; 1 - alpha goes to hard labels."),
    divergence: Optional[str] = typer.Option(None, help="forward_kl (Hinton), reverse_kl, jsd or tvd."),
    transfer_size: Optional[int] = typer.Option(None, help="Extra unlabeled inputs labeled by the teacher."),
    epochs: Optional[int] = typer.Option(None, help="Epochs of the distilled students."),
    teacher_epochs: Optional[int] = typer.Option(None, help="Epochs of each teacher (fine-tuning for sst2)."),
    seed: Optional[int] = typer.Option(None, help="Random seed of data order, initialisation and samples."),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="YAML file with any of these settings."),
    set_: list[str] = typer.Option([], "--set", help="Override a config key, e.g. --set loss.temperature=4."),
    output: Optional[Path] = typer.Option(
        None, "--output", "-o", help="Output directory (default runs/<recipe>-<time>)."
    ),
    resume: bool = typer.Option(False, help="Continue a killed run from its checkpoints (the newest, or --output)."),
    as_json: bool = typer.Option(False, "--json", help="Print metrics.json to stdout instead of the table."),
) -> None:
    """Run a built-in recipe end to end: teacher(s), students alone and distilled, the report.

    The default, MNIST-1D, trains a 1-D CNN teacher, then distills it into a small MLP using a transfer set of
    freshly generated signals, and compares it with the same MLP trained alone. stsb and sst2 distill the real
    all-MiniLM-L6-v2 (the minilm extra) into students derived from its layers.
    """
    from distill.recipes import RECIPES

    name = recipe
    if name is None and config is not None:
        name = cfg.load_mapping(config).get("recipe")
    name = name or "mnist1d"
    if name not in RECIPES:
        raise DistillError(f"unknown recipe {name!r}; choose one of {', '.join(RECIPES)}")
    given = {
        "teachers": teachers,
        "ensemble": ensemble,
        "student_width": student_width,
        "teacher": teacher,
        "sample_size": sample_size,
        "data_dir": data_dir,
        "temperature": temperature,
        "alpha": alpha,
        "divergence": divergence,
        "transfer_size": transfer_size,
        "epochs": epochs,
        "teacher_epochs": teacher_epochs,
        "seed": seed,
    }
    mapping = RUN_OPTIONS[name]
    for option, value in given.items():
        if value is not None and option not in mapping:
            takers = [r for r, m in RUN_OPTIONS.items() if option in m]
            raise DistillError(
                f"--{option.replace('_', '-')} does not apply to the {name} recipe (it applies to {', '.join(takers)})"
            )
    overrides = [f"recipe={name}", *set_] + [f"{mapping[k]}={v}" for k, v in given.items() if v is not None]
    model, runner = RECIPES[name]
    run_config = cfg.load(model, config, overrides)
    folder = getattr(run_config, "data_dir", None) or default_data_dir()
    if (
        name in ("stsb", "sst2", "lm")
        and getattr(run_config, "corpus", None) is None
        and (folder is None or not Path(folder).is_dir())
    ):
        raise DistillError(
            f"the {name} recipe needs the reference data sets (sst2/, stsb/, agnews/); pass --data-dir PATH "
            "(see ../shared/data/README.md)"
        )
    directory = output_dir(output, name, resume)
    with RichReporter(err, enabled=not as_json) as reporter:
        metrics = runner(
            run_config, directory, resume=resume, cache_dir=cache_dir(), data_dir=folder, reporter=reporter
        )
    if as_json:
        out.print_json(json.dumps(_without(metrics, "history"), default=str))
    elif name in ("mnist1d", "digits"):
        print_classification(metrics, directory)
    else:
        print_report_tables(metrics, directory)


@app.command("train")
def train_command(
    config: Path = typer.Option(
        ..., "--config", "-c", help="YAML file: data, student, teacher (optional), loss, train."
    ),
    set_: list[str] = typer.Option([], "--set", help="Override a config key, e.g. --set train.epochs=5."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Output directory (default runs/train-<time>)."),
    resume: bool = typer.Option(False, help="Continue a killed run from its checkpoints."),
    as_json: bool = typer.Option(False, "--json", help="Print metrics.json to stdout instead of the table."),
) -> None:
    """Train a built-in MLP/CNN on your own arrays (CSV, TSV or NPZ), distilled from saved teachers if given.

    Without `teacher:` the model is trained on the labels alone and saved, ready to teach another run.
    """
    from distill.recipes.arrays import run_train_job

    job = cfg.load(cfg.TrainJobConfig, config, list(set_))
    directory = output_dir(output, "train", resume)
    with RichReporter(err, enabled=not as_json) as reporter:
        metrics = run_train_job(job, directory, resume=resume, reporter=reporter)
    if as_json:
        out.print_json(json.dumps(_without(metrics, "history"), default=str))
    elif "model" in metrics:
        m = metrics["model"]
        out.print(f"test accuracy {100 * m['accuracy']:.1f} %, {m['params']:,} parameters; saved to {m['path']}")
    else:
        print_classification(metrics, directory)


cache_app = typer.Typer(help="Teacher log-prob caches for language models: score the data once, train many students.")
app.add_typer(cache_app, name="cache")


@cache_app.command("build")
def cache_build(
    teacher: str = typer.Option(..., help="The teacher: a causal LM folder (save_pretrained) or a hub name."),
    data: Path = typer.Option(..., help="JSONL: prompt/completion, messages, text or question/answer rows."),
    top_k: int = typer.Option(64, help="Log-probs kept per token (about 300 bytes a token at 128)."),
    directory: Path = typer.Option(..., "--out", help="The cache directory (a killed build resumes in it)."),
    temperature: float = typer.Option(1.0, help="Temperature of the stored distribution (the loss must match it)."),
    max_length: int = typer.Option(512, help="Tokens per example (longer ones are cut)."),
    batch_size: int = typer.Option(8, help="Sequences scored at once."),
) -> None:
    """Score a data file once with a teacher LM and store its top-k next-token log-probs, sharded and checksummed."""
    from distill.teachers import hf

    given = {"top_k": top_k, "temperature": temperature, "max_length": max_length, "batch_size": batch_size}
    options = checked_options(cfg.CacheBuildOptions, given)  # the bounds of the service's cache-build jobs
    with RichReporter(err) as reporter:
        hf.build_lm_cache(teacher, data, directory, **options.model_dump(), cache_dir=cache_dir(), reporter=reporter)
    from distill.teachers.token_cache import verify_token_cache

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
    from distill.teachers import hf
    from distill.teachers.api_logprobs import cache_from_generated as build

    with RichReporter(err) as reporter:
        tokenizer = hf.load_tokenizer(student, cache_dir())
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
    from distill.recipes.lm import run_lm_job

    job = cfg.load(cfg.LMJobConfig, config, list(set_))
    directory = output_dir(output, "lm", resume)
    rank = int(os.environ.get("RANK", "0"))
    with RichReporter(err, enabled=rank == 0) as reporter:
        metrics = run_lm_job(job, directory, cache_dir=cache_dir(), resume=resume, reporter=reporter)
    if rank == 0:
        out.print_json(json.dumps(_without(metrics, "history"), default=str))


@app.command()
def report(run_dir: Path = typer.Argument(..., help="A run directory holding metrics.json.")) -> None:
    """Render report.md and report.html again from a run's metrics.json."""
    from distill import report as rep
    from distill.data import read_json
    from distill.report_recipes import REPORTS

    path = run_dir / "metrics.json"
    if not path.is_file():
        raise DistillError(f"{path} does not exist; is {run_dir} a run directory?")
    metrics = read_json(path)  # a one-line error when not UTF-8, not JSON or nested too deeply
    try:
        rendered = REPORTS[metrics["recipe"]](metrics)
    except (ValueError, KeyError, TypeError, AttributeError, IndexError) as error:
        raise DistillError(f"{path} is not the metrics of a distill run ({error})") from None
    rep.write(rendered, run_dir)
    out.print(f"Wrote {run_dir}/report.md and {run_dir}/report.html")


def _init_distributed() -> None:
    """Under torchrun (WORLD_SIZE > 1), join the process group: NCCL on GPUs, gloo on CPUs."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        import torch
        import torch.distributed as dist

        if not dist.is_initialized():
            backend = "nccl" if torch.cuda.is_available() else "gloo"
            if backend == "nccl":
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            dist.init_process_group(backend)


def _leave_distributed() -> None:
    """After a command that ran under torchrun: wait for every process, then leave the group (a process that exits
    while gloo's threads still hold work can abort with "terminate called without an active exception")."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def main() -> None:
    """Entry point: run the app, turning user errors into one line and a non-zero exit."""
    try:
        _init_distributed()
        app(standalone_mode=False)
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            _leave_distributed()
    except DistillError as error:
        err.print(f"[red]error:[/red] {error}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except UsageError as error:
        command = error.ctx.command_path if error.ctx is not None else "distill"
        if type(error).__name__ == "NoArgsIsHelpError":
            err.print(error.ctx.get_help() if error.ctx is not None else "")
            sys.exit(2)
        message = error.format_message().splitlines()[0]
        err.print(f"[red]error:[/red] {message} (see: {command} --help)", highlight=False, soft_wrap=True)
        sys.exit(2)
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


# The black-box commands (serve, generate, traces) register themselves on `app`.
from distill import cli_text  # noqa: E402, F401

# `distill service` and `distill worker` (they need the [service] extra).
try:
    from distill import cli_service  # noqa: E402, F401
except ModuleNotFoundError as missing:  # pragma: no cover - only without the [service] extra
    if missing.name not in ("fastapi", "sqlalchemy", "uvicorn", "httpx"):
        raise

if __name__ == "__main__":  # `python -m distill.cli`: run the imported module, where every command is registered
    from distill import cli as _cli

    _cli.main()
