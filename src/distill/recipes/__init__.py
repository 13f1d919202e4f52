"""Built-in end-to-end recipes, each a plain function: data, teacher(s), students, evaluation, report.

`distill run --recipe NAME` looks NAME up in `RECIPES`: its config model and the function that runs it. Every run
function takes the config and the output directory (plus where data and caches live) and returns the metrics; it
writes metrics.json, report.md, report.html and the resolved config.yaml into the output directory.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from distill import report
from distill.config import ClassifyRunConfig, LMRunConfig, ReasoningRunConfig, Sst2RunConfig, StsbRunConfig, dump
from distill.errors import DistillError
from distill.progress import NULL, Reporter
from distill.recipes import digits, mnist1d
from distill.recipes.classify import Problem, finish, run_classification
from distill.report_recipes import REPORTS

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
    data_dir: Path | None = None,
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


def _write(metrics: dict[str, Any], output: Path, config: BaseModel) -> dict[str, Any]:
    report.write(REPORTS[metrics["recipe"]](metrics), output, metrics)
    (output / "config.yaml").write_text(dump(config))
    return metrics


def _folders(kind: str, cache_dir: Path | None, data_dir: Path | None) -> tuple[Path, Path]:
    if cache_dir is None or data_dir is None:
        raise DistillError(f"the {kind} recipe needs a cache directory and a data directory")
    return cache_dir, data_dir


def run_stsb_recipe(
    config: StsbRunConfig,
    output: Path,
    *,
    resume: bool = False,
    cache_dir: Path | None = None,
    data_dir: Path | None = None,
    reporter: Reporter = NULL,
) -> dict[str, Any]:
    """Sentence-embedding students on STS-B (see `distill.recipes.stsb`); writes the outputs into `output`."""
    from distill.recipes.stsb import run_stsb

    cache, data = _folders("stsb", cache_dir, data_dir)
    metrics = run_stsb(config, output, data_dir=data, cache_dir=cache, resume=resume, reporter=reporter)
    metrics.update(embedding_weight=config.embedding_weight, hidden_weight=config.hidden_weight)
    return _write(metrics, output, config)


def run_sst2_recipe(
    config: Sst2RunConfig,
    output: Path,
    *,
    resume: bool = False,
    cache_dir: Path | None = None,
    data_dir: Path | None = None,
    reporter: Reporter = NULL,
) -> dict[str, Any]:
    """Transformer and BiLSTM students on SST-2 (see `distill.recipes.sst2`); writes the outputs into `output`."""
    from distill.recipes.sst2 import run_sst2

    cache, data = _folders("sst2", cache_dir, data_dir)
    metrics = run_sst2(config, output, data_dir=data, cache_dir=cache, resume=resume, reporter=reporter)
    return _write(metrics, output, config)


def run_lm_recipe(
    config: LMRunConfig,
    output: Path,
    *,
    resume: bool = False,
    cache_dir: Path | None = None,
    data_dir: Path | None = None,
    reporter: Reporter = NULL,
) -> dict[str, Any]:
    """A teacher LM, its log-prob cache and a student distilled from it (see `distill.recipes.lm`)."""
    from distill.recipes.lm import run_lm

    if cache_dir is None:
        raise DistillError("the lm recipe needs a cache directory")
    metrics = run_lm(config, output, data_dir=data_dir, cache_dir=cache_dir, resume=resume, reporter=reporter)
    return _write(metrics, output, config)


def run_reasoning_recipe(
    config: ReasoningRunConfig,
    output: Path,
    *,
    resume: bool = False,
    cache_dir: Path | None = None,
    data_dir: Path | None = None,
    reporter: Reporter = NULL,
) -> dict[str, Any]:
    """Chain-of-thought distillation through the teacher's API (see `distill.recipes.reasoning`); needs no data
    folder (the problems are generated)."""
    from distill.recipes.reasoning import run_reasoning

    metrics = run_reasoning(config, output, cache_dir=cache_dir, resume=resume, reporter=reporter)
    return _write(metrics, output, config)


RECIPES: dict[str, tuple[type[BaseModel], Callable[..., dict[str, Any]]]] = {
    "mnist1d": (ClassifyRunConfig, run_array_recipe),
    "digits": (ClassifyRunConfig, run_array_recipe),
    "stsb": (StsbRunConfig, run_stsb_recipe),
    "sst2": (Sst2RunConfig, run_sst2_recipe),
    "lm": (LMRunConfig, run_lm_recipe),
    "reasoning": (ReasoningRunConfig, run_reasoning_recipe),
}
