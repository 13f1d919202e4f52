"""Built-in end-to-end recipes, each a plain function: data, teacher(s), students, evaluation, report.

`distill run --recipe NAME` picks one from `ARRAY_RECIPES` (soft-target distillation of a classifier on arrays).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from distill.config import ClassifyRunConfig, dump
from distill.progress import NULL, Reporter
from distill.recipes import digits, mnist1d
from distill.recipes.classify import Problem, finish, run_classification

ARRAY_RECIPES: dict[str, Callable[[ClassifyRunConfig, Path | None], Problem]] = {
    "mnist1d": mnist1d.problem,
    "digits": digits.problem,
}


def run_array_recipe(
    config: ClassifyRunConfig,
    output: Path,
    *,
    resume: bool = False,
    cache_dir: Path | None = None,
    reporter: Reporter = NULL,
) -> dict[str, Any]:
    """Run a classification recipe end to end and write its outputs into `output`; return the metrics."""
    started = time.perf_counter()
    output.mkdir(parents=True, exist_ok=True)
    reporter.stage("data", total=None)
    problem = ARRAY_RECIPES[config.recipe](config, cache_dir)
    reporter.end()
    metrics = run_classification(
        problem,
        teachers=config.teachers,
        ensemble=config.ensemble,
        seed=config.seed,
        output=output,
        resume=resume,
        reporter=reporter,
    )
    metrics["seconds"] = time.perf_counter() - started
    finish(metrics, output, dump(config))
    return metrics
