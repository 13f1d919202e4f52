"""The `Recipe` type, and `run_recipe`: how any recipe runs into a folder and leaves its report there."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distill import report
from distill.config import Strict, dump
from distill.errors import DistillError
from distill.model_card import student_folders, write_cards
from distill.stages import RunContext


@dataclass(frozen=True)
class Recipe:
    """One recipe: what `distill run --recipe NAME`, the service's `recipe` jobs and the dashboard's form use."""

    name: str
    summary: str  # one line: what it does
    config: type[Strict]  # its settings, defaults included
    run: Callable[[Any, RunContext], dict[str, Any]]  # (config, context) -> the metrics
    report: Callable[[dict[str, Any]], report.Report]
    flags: dict[str, str]  # `distill run` option -> the config key it sets
    needs_datasets: Callable[[Any], bool] = lambda config: False  # the reference data sets (sst2/, stsb/, agnews/)


def run_recipe(recipe: Recipe, config: Strict, run: RunContext) -> dict[str, Any]:
    """Run `recipe` into `run.output` (continuing an earlier attempt there with `run.resume`) and write its
    metrics.json, report.md, report.html, resolved config.yaml and a model card in every student folder; return the
    metrics."""
    started = time.perf_counter()
    run.output.mkdir(parents=True, exist_ok=True)
    metrics = recipe.run(config, run)
    metrics["seconds"] = time.perf_counter() - started
    rendered = recipe.report(metrics)
    report.write(rendered, run.output, metrics)
    (run.output / "config.yaml").write_text(dump(config))
    write_cards(student_folders(run.output), rendered, dump(config), metrics, teacher_name(config))
    return metrics


def teacher_name(config: Any) -> str | None:
    """The teacher a card names as the student's base model: a model name or folder given in the config (the
    packaged MiniLM by its hub name), None when the recipe trains its own teacher."""
    teacher = getattr(config, "teacher", None)
    if not isinstance(teacher, str):
        return None
    return "sentence-transformers/all-MiniLM-L6-v2" if teacher == "minilm-l6" else teacher


def datasets_folder(config: Any, run: RunContext, recipe: str) -> Path:
    """The reference data sets a text recipe reads: its `data_dir` setting, else the run's; a clear error when
    neither is a folder."""
    folder = getattr(config, "data_dir", None) or run.datasets
    if folder is None or not Path(folder).is_dir():
        raise DistillError(
            f"the {recipe} recipe needs the reference data sets (sst2/, stsb/, agnews/); pass --data-dir PATH "
            "(see ../shared/data/README.md)"
        )
    return Path(folder)
