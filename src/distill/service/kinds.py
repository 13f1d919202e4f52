"""Job kinds: for each, the pydantic config it takes (the CLI's own where the CLI has one) and the library call.

| kind          | config                                               | runs                                   |
| ------------- | ---------------------------------------------------- | -------------------------------------- |
| `recipe`      | the recipe's own model (`RECIPES`; mnist1d by default) | `distill run --recipe NAME`          |
| `train`       | `ArraysJobConfig`                                    | `distill train`                        |
| `train-lm`    | `LMJobConfig`                                        | `distill train-lm`                     |
| `cache-build` | `CacheBuildJobConfig`; with `api`, `ServedCacheBuildJobConfig` | `distill cache build` (`--base-url`) |
| `generate`    | `GenerateJobConfig` (below)                          | `distill generate`, against a configured endpoint |
| `evaluate`    | `EvaluateJobConfig` (`service/evaluation.py`)        | a saved MLP/CNN scored on an uploaded file |

A config is resolved by `distill.config.resolve`, as the CLI resolves it (the model's defaults, then the job's
values; sections given in part keep the rest of their defaults), after its file and job ids are resolved to paths.
Each run function takes the validated config and the run's context (its folder, whether to resume, the reporter,
the service's store and data-set folders: the library never looks them up itself).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from distill.config import CacheBuildOptions, ConfigError, GenerateOptions, ServedCacheOptions, resolve
from distill.recipes import RECIPES, run_recipe
from distill.service.errors import ServiceError
from distill.service.evaluation import EvaluateJobConfig, check_evaluate, evaluate_saved
from distill.service.refs import Resolver
from distill.service.refs import resolve as resolve_refs
from distill.service.settings import Settings
from distill.stages import RunContext
from distill.train_arrays import ArraysJobConfig, run_train_arrays
from distill.train_lm import LMJobConfig, run_train_lm


class CacheBuildJobConfig(CacheBuildOptions):
    """`distill cache build`: score a JSONL file once with a teacher LM and keep its top-k log-probs (the settings
    and their bounds are the CLI's, `CacheBuildOptions`)."""

    teacher: str = Field(description="the teacher: a finished job's causal LM (job-...); or give api instead")
    data: Path = Field(description="JSONL: prompt/completion, messages, text or question/answer rows (file-...)")


class ServedCacheBuildJobConfig(ServedCacheOptions):
    """`distill cache build --base-url`: the same cache, scored by a teacher endpoint configured on the service (as
    generate jobs call one) through teacher-forced scoring; the settings and their bounds are the CLI's,
    `ServedCacheOptions`."""

    api: str = Field(
        max_length=200, description="name of a teacher endpoint configured on the service (DISTILL_TEACHERS)"
    )
    model: str = Field(min_length=1, max_length=200, description="the teacher model's id at that endpoint")
    student: str = Field(description="the student whose tokenizer the cache is for: a finished job's causal LM")
    data: Path = Field(description="JSONL: prompt/completion, messages, text or question/answer rows (file-...)")


class GenerateJobConfig(GenerateOptions):
    """`distill generate`: a teacher's answers to prompts, kept as training data (resumable); the settings and their
    bounds are the CLI's, `GenerateOptions`."""

    api: str = Field(
        max_length=200, description="name of a teacher endpoint configured on the service (DISTILL_TEACHERS)"
    )
    model: str = Field(min_length=1, max_length=200, description="the teacher model's id at that endpoint")
    prompts: Path = Field(description="JSONL (prompt, messages or question/answer) or .txt (file-...)")


def _recipe_model(raw: dict[str, Any]) -> tuple[type[BaseModel], dict[str, Any]]:
    name = raw.get("recipe", "mnist1d")
    if name not in RECIPES:
        raise ServiceError(
            422, f"config.recipe: unknown recipe {name!r}; choose one of {', '.join(RECIPES)}", param="config.recipe"
        )
    return RECIPES[name].config, {**raw, "recipe": name}


def _cache_build_model(raw: dict[str, Any]) -> tuple[type[BaseModel], dict[str, Any]]:
    """A cache-build job's teacher is a finished job's model (`teacher`) or a configured endpoint (`api`)."""
    if "api" not in raw:
        return CacheBuildJobConfig, raw
    if "teacher" in raw:
        raise ServiceError(
            422, "config.teacher: give teacher (a job's model) or api (a teacher endpoint), not both",
            param="config.teacher",
        )  # fmt: skip
    return ServedCacheBuildJobConfig, raw


def _check_cache_build(config: BaseModel, settings: Settings) -> None:
    if isinstance(config, ServedCacheBuildJobConfig):
        _check_generate(config, settings)


def _check_recipe(config: BaseModel, settings: Settings) -> None:
    recipe = RECIPES[str(getattr(config, "recipe", ""))]
    if recipe.needs_datasets(config) and settings.datasets_dir is None:
        also = " (or give corpus: file-...)" if recipe.name == "lm" else ""
        raise ServiceError(
            422,
            f"config.recipe: the {recipe.name} recipe needs the reference data sets, and this service was started "
            f"without --datasets-dir{also}",
            param="config.recipe",
        )


def _check_generate(config: BaseModel, settings: Settings) -> None:
    api = getattr(config, "api", "")
    if api not in settings.teachers:
        known = ", ".join(settings.teachers) or "none are configured (DISTILL_TEACHERS)"
        raise ServiceError(422, f"config.api: unknown teacher endpoint {api!r}; known: {known}", param="config.api")


def _run_recipe(config: Any, run: RunContext, settings: Settings) -> dict[str, Any]:
    return run_recipe(RECIPES[config.recipe], config, run)


def _run_cache_build(config: Any, run: RunContext, settings: Settings) -> dict[str, Any]:
    from distill import hf
    from distill.teachers.served_cache import build_served_cache_with
    from distill.teachers.token_cache import verify_token_cache

    directory = run.output / "teacher-cache"
    served: dict[str, Any] = {}
    if isinstance(config, ServedCacheBuildJobConfig):
        base_url, api_key = settings.teachers[config.api]
        options = ServedCacheOptions.model_validate(config.model_dump(include=set(ServedCacheOptions.model_fields)))
        tokenizer = hf.load_tokenizer(config.student, run.store)
        summary = build_served_cache_with(options, base_url, config.model, api_key, config.data, tokenizer, directory,
                                          run.reporter)  # fmt: skip
        served = {"served": summary.to_json()}
    else:
        local = CacheBuildOptions.model_validate(config.model_dump(include=set(CacheBuildOptions.model_fields)))
        hf.build_lm_cache(config.teacher, config.data, directory, **local.model_dump(), store=run.store,
                          reporter=run.reporter)  # fmt: skip
    metrics = {"recipe": "cache-build", **verify_token_cache(directory), **served}
    (run.output / "metrics.json").write_text(json.dumps(metrics, indent=2, default=str))
    return metrics


def _run_generate(config: Any, run: RunContext, settings: Settings) -> dict[str, Any]:
    from distill.generate.answers import generate_with, read_prompts

    base_url, api_key = settings.teachers[config.api]
    options = GenerateOptions.model_validate(config.model_dump(include=set(GenerateOptions.model_fields)))
    run.output.mkdir(parents=True, exist_ok=True)
    prompts = read_prompts(config.prompts, limit=config.limit)
    summary = generate_with(options, prompts, base_url, config.model, api_key, run.output / "generated.jsonl",
                            run.reporter)  # fmt: skip
    metrics = {"recipe": "generate", **asdict(summary), "path": "generated.jsonl", "rate": summary.rate}
    (run.output / "metrics.json").write_text(json.dumps(metrics, indent=2, default=str))
    return metrics


@dataclass(frozen=True)
class Kind:
    model: Callable[[dict[str, Any]], tuple[type[BaseModel], dict[str, Any]]]  # the config model for a raw config
    models: str  # which model folders its model fields take: "array" (model.json), "hf" (config.json) or "any"
    run: Callable[[Any, RunContext, Settings], dict[str, Any]]
    check: Callable[[BaseModel, Settings], None] | None = None


def _fixed(model: type[BaseModel]) -> Callable[[dict[str, Any]], tuple[type[BaseModel], dict[str, Any]]]:
    return lambda raw: (model, raw)


KINDS: dict[str, Kind] = {
    "recipe": Kind(_recipe_model, "hf", _run_recipe, _check_recipe),
    "train": Kind(_fixed(ArraysJobConfig), "array", lambda c, r, s: run_train_arrays(c, r)),
    "train-lm": Kind(_fixed(LMJobConfig), "hf", lambda c, r, s: run_train_lm(c, r)),
    "cache-build": Kind(_cache_build_model, "hf", _run_cache_build, _check_cache_build),
    "generate": Kind(_fixed(GenerateJobConfig), "hf", _run_generate, _check_generate),
    "evaluate": Kind(
        _fixed(EvaluateJobConfig), "any", lambda c, r, s: evaluate_saved(c, r.output, r.reporter), check_evaluate
    ),
}


def parse(kind: str, raw: Any, settings: Settings, resolver: Resolver) -> BaseModel:
    """The validated config of a job, ids resolved to paths and resolved to a full config as the CLI does
    (`distill.config.resolve`); ServiceError 422 naming the field otherwise."""
    if kind not in KINDS:
        raise ServiceError(422, f"kind: unknown job kind {kind!r}; choose one of {', '.join(KINDS)}", param="kind")
    if not isinstance(raw, dict):
        raise ServiceError(422, "config: must be a JSON object", param="config")
    spec = KINDS[kind]
    model, raw = spec.model(raw)
    try:
        config = resolve(model, resolve_refs(model, raw, resolver, models=spec.models))
    except ConfigError as error:
        where, message = error.problems[0]
        param = ".".join(["config", where]) if where else "config"
        others = f" (and {len(error.problems) - 1} more)" if len(error.problems) > 1 else ""
        raise ServiceError(422, f"{param}: {message}{others}", param=param) from None
    if spec.check is not None:
        spec.check(config, settings)
    return config


def run(kind: str, config: BaseModel, context: RunContext, settings: Settings) -> dict[str, Any]:
    """Run a parsed job; returns its metrics (the library also writes them into the output folder)."""
    return KINDS[kind].run(config, context, settings)
