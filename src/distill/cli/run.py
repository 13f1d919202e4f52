"""`distill run` (the built-in recipes), `distill train` (your own arrays) and `distill report`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import typer
from rich.table import Table

from distill import config as cfg
from distill.cli.app import RichReporter, app, default_data_dir, err, out, output_dir, store_dir, without
from distill.cli.tracking import tracked
from distill.errors import DistillError


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


def print_report_tables(rendered: Any, metrics: dict[str, Any], output: Path) -> None:
    """A recipe's report tables and summary on the terminal (the full report is in report.md)."""
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
    student_tokenizer: Optional[str] = typer.Option(
        None,
        help="(lm) same (default), or other: the students get a tokenizer of their own (a SentencePiece-style "
        "unigram) and learn from the teacher token by token, aligned by text; the report compares bits per byte.",
    ),
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
    from distill.recipes import RECIPES, run_recipe
    from distill.stages import RunContext

    name = recipe or (cfg.load_mapping(config).get("recipe") if config is not None else None) or "mnist1d"
    if name not in RECIPES:
        raise DistillError(f"unknown recipe {name!r}; choose one of {', '.join(RECIPES)}")
    chosen = RECIPES[name]
    flags = {"teachers": teachers, "ensemble": ensemble, "student_width": student_width, "teacher": teacher,
             "sample_size": sample_size, "data_dir": data_dir, "temperature": temperature, "alpha": alpha,
             "divergence": divergence, "transfer_size": transfer_size, "epochs": epochs,
             "teacher_epochs": teacher_epochs, "seed": seed, "student_tokenizer": student_tokenizer}  # fmt: skip
    overrides = [f"recipe={name}", *set_] + _flag_overrides(chosen, flags)
    run_config = cfg.load(chosen.config, config, overrides)
    given = getattr(run_config, "data_dir", None)
    datasets = given or default_data_dir()
    missing = datasets is None or not Path(datasets).is_dir()
    if chosen.needs_datasets(run_config) and missing and (given is not None or not _from_hub(name)):
        raise DistillError(
            f"the {name} recipe needs the reference data sets (sst2/, stsb/, agnews/); pass --data-dir PATH "
            "(see ../shared/data/README.md)"
        )
    directory = output_dir(output, name, resume)
    with RichReporter(err, enabled=not as_json) as bars, tracked(bars, run_config, directory, name, resume) as reporter:
        context = RunContext(directory, resume, reporter, store_dir(), Path(datasets) if datasets else None)
        metrics = run_recipe(chosen, run_config, context)
        reporter.finish(metrics)
    if as_json:
        out.print_json(json.dumps(without(metrics, "history"), default=str))
    elif name in ("mnist1d", "digits"):
        print_classification(metrics, directory)
    else:
        print_report_tables(chosen.report(metrics), metrics, directory)


def _from_hub(recipe: str) -> bool:
    """Whether the recipe reads its data sets from the Hugging Face Hub when no folder is given or found (GLUE's
    SST-2 and STS-B: the sst2 and stsb recipes) and the machine is online."""
    if recipe not in ("sst2", "stsb"):
        return False
    from distill.sources import online

    return online()


def _flag_overrides(recipe: Any, flags: dict[str, Any]) -> list[str]:
    """`key=value` overrides of the flags given, through the recipe's flag map; a flag the recipe does not take is an
    error naming the recipes that do."""
    from distill.recipes import RECIPES

    overrides = []
    for option, value in flags.items():
        if value is None:
            continue
        if option not in recipe.flags:
            takers = [r.name for r in RECIPES.values() if option in r.flags]
            raise DistillError(
                f"--{option.replace('_', '-')} does not apply to the {recipe.name} recipe (it applies to "
                f"{', '.join(takers)})"
            )
        overrides.append(f"{recipe.flags[option]}={value}")
    return overrides


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
    from distill.stages import RunContext
    from distill.train_arrays import ArraysJobConfig, run_train_arrays

    job = cfg.load(ArraysJobConfig, config, list(set_))
    directory = output_dir(output, "train", resume)
    with RichReporter(err, enabled=not as_json) as bars, tracked(bars, job, directory, "train", resume) as reporter:
        metrics = run_train_arrays(job, RunContext(directory, resume, reporter, store_dir()))
        reporter.finish(metrics)
    if as_json:
        out.print_json(json.dumps(without(metrics, "history"), default=str))
    elif "model" in metrics:
        m = metrics["model"]
        out.print(f"test accuracy {100 * m['accuracy']:.1f} %, {m['params']:,} parameters; saved to {m['path']}")
    else:
        print_classification(metrics, directory)


@app.command()
def report(run_dir: Path = typer.Argument(..., help="A run directory holding metrics.json.")) -> None:
    """Render report.md and report.html again from a run's metrics.json."""
    from distill import report as rep
    from distill.data import read_json
    from distill.recipes import RECIPES
    from distill.train_arrays import report_of

    path = run_dir / "metrics.json"
    if not path.is_file():
        raise DistillError(f"{path} does not exist; is {run_dir} a run directory?")
    metrics = read_json(path)  # a one-line error when not UTF-8, not JSON or nested too deeply
    try:
        name = metrics["recipe"]
        rendered = report_of(metrics) if name == "train" else RECIPES[name].report(metrics)
    except (ValueError, KeyError, TypeError, AttributeError, IndexError) as error:
        raise DistillError(f"{path} is not the metrics of a distill run ({error})") from None
    rep.write(rendered, run_dir)
    out.print(f"Wrote {run_dir}/report.md and {run_dir}/report.html")
