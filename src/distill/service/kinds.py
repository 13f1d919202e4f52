"""Job kinds: for each, the pydantic config it takes (the CLI's own where the CLI has one) and the library call.

| kind          | config                                  | runs                                              |
| ------------- | --------------------------------------- | ------------------------------------------------- |
| `recipe`      | the recipe's model in `RECIPES` (mnist1d by default) | `distill run --recipe NAME`          |
| `train`       | `TrainJobConfig`                        | `distill train`                                   |
| `train-lm`    | `LMJobConfig`                           | `distill train-lm`                                |
| `cache-build` | `CacheBuildJobConfig` (below)           | `distill cache build`                             |
| `generate`    | `GenerateJobConfig` (below)             | `distill generate`, against a configured endpoint |
| `evaluate`    | `EvaluateJobConfig` (below)             | a saved MLP/CNN scored on an uploaded file        |

Each run function takes the validated config, the job's output folder, whether to resume (the folder holds an
earlier attempt's checkpoints) and the reporter; the service passes its cache and data-set folders, the library never
looks them up itself.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, ValidationError

from distill.config import (
    CacheBuildOptions,
    Length,
    LMJobConfig,
    Rows,
    SamplingTemperature,
    Seed,
    Strict,
    TrainJobConfig,
    Workers,
)
from distill.progress import Reporter
from distill.recipes import RECIPES
from distill.service.errors import ServiceError
from distill.service.refs import Resolver, resolve
from distill.service.settings import Settings

TEXT_RECIPES = ("stsb", "sst2")


class CacheBuildJobConfig(CacheBuildOptions):
    """`distill cache build`: score a JSONL file once with a teacher LM and keep its top-k log-probs (the bounds of
    top_k, temperature, max_length and batch_size are the CLI's, from `CacheBuildOptions`)."""

    teacher: str = Field(description="the teacher: a finished job's causal LM (job-...)")
    data: Path = Field(description="JSONL: prompt/completion, messages, text or question/answer rows (file-...)")


class GenerateJobConfig(Strict):
    """`distill generate`: a teacher's answers to prompts, kept as training data (resumable)."""

    api: str = Field(
        max_length=200, description="name of a teacher endpoint configured on the service (DISTILL_TEACHERS)"
    )
    model: str = Field(min_length=1, max_length=200, description="the teacher model's id at that endpoint")
    prompts: Path = Field(description="JSONL (prompt, messages or question/answer) or .txt (file-...)")
    n: Annotated[int, Field(ge=1, le=64)] = 1
    temperature: SamplingTemperature = 1.0
    top_p: Annotated[float, Field(gt=0, le=1)] = 1.0
    max_tokens: Length | None = None
    stop: list[Annotated[str, Field(max_length=1_000)]] = Field(default_factory=list, max_length=4)
    seed: Seed | None = None
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    cot: bool = False
    template: str | None = Field(None, max_length=10_000)
    endpoint: Literal["chat", "completions"] = "chat"
    concurrency: Annotated[Workers, Field(le=256)] = 16
    timeout: Annotated[float, Field(gt=0, le=3600)] = 120.0
    max_retries: Annotated[int, Field(ge=0, le=20)] = 6
    limit: Annotated[Rows, Field(ge=1)] | None = None


class EvaluateJobConfig(Strict):
    """Score a saved MLP/CNN (and optionally its teacher) on a labeled CSV/TSV/NPZ file."""

    student: str = Field(
        max_length=1_000, description="the model to score: a finished job's model (job-... or job-.../NAME)"
    )
    teacher: str | None = Field(
        None, max_length=1_000, description="a teacher to compare with (agreement, KL), same refs"
    )
    data: Path = Field(description="labeled rows: CSV/TSV with a label column or NPZ (file-...)")
    label_column: str = Field("label", max_length=1_000)
    features_key: str = Field("x", max_length=1_000)
    labels_key: str = Field("y", max_length=1_000)


@dataclass(frozen=True)
class Run:
    """What a run function gets besides its config."""

    output: Path
    settings: Settings
    resume: bool
    reporter: Reporter


def _recipe_model(raw: dict[str, Any]) -> tuple[type[BaseModel], dict[str, Any]]:
    name = raw.get("recipe", "mnist1d")
    if name not in RECIPES:
        raise ServiceError(
            422, f"config.recipe: unknown recipe {name!r}; choose one of {', '.join(RECIPES)}", param="config.recipe"
        )
    return RECIPES[name][0], {**raw, "recipe": name}


def _check_recipe(config: BaseModel, settings: Settings) -> None:
    name = getattr(config, "recipe", "")
    needs = name in TEXT_RECIPES or (name == "lm" and getattr(config, "corpus", None) is None)
    if needs and settings.datasets_dir is None:
        raise ServiceError(
            422,
            f"config.recipe: the {name} recipe needs the reference data sets, and this service was started without "
            "--datasets-dir" + (" (or give corpus: file-...)" if name == "lm" else ""),
            param="config.recipe",
        )


def _check_generate(config: BaseModel, settings: Settings) -> None:
    api = getattr(config, "api", "")
    if api not in settings.teachers:
        known = ", ".join(settings.teachers) or "none are configured (DISTILL_TEACHERS)"
        raise ServiceError(422, f"config.api: unknown teacher endpoint {api!r}; known: {known}", param="config.api")


def _run_recipe(config: BaseModel, run: Run) -> dict[str, Any]:
    name = str(getattr(config, "recipe", ""))
    metrics = RECIPES[name][1](
        config,
        run.output,
        resume=run.resume,
        cache_dir=run.settings.cache_dir,
        data_dir=run.settings.datasets_dir,
        reporter=run.reporter,
    )
    if name == "lm":
        _servable_lm_models(run.output)
    return metrics


def _servable_lm_models(output: Path) -> None:
    """The lm recipe keeps its tokenizer beside its models (`tokenizer/`, `models/NAME/`): copy it into each model
    folder, and the distilled student into `student/`, so that every one loads (and serves) on its own."""
    tokenizer = output / "tokenizer"
    for folder in [p for p in (output / "models").iterdir() if p.is_dir()]:
        for file in tokenizer.iterdir():
            shutil.copyfile(file, folder / file.name)
    if (output / "models" / "student-distilled").is_dir():
        shutil.copytree(output / "models" / "student-distilled", output / "student", dirs_exist_ok=True)


def _run_train(config: BaseModel, run: Run) -> dict[str, Any]:
    from distill.recipes.arrays import run_train_job

    assert isinstance(config, TrainJobConfig)
    return run_train_job(config, run.output, resume=run.resume, reporter=run.reporter)


def _run_train_lm(config: BaseModel, run: Run) -> dict[str, Any]:
    from distill.recipes.lm import run_lm_job

    assert isinstance(config, LMJobConfig)
    return run_lm_job(config, run.output, cache_dir=run.settings.cache_dir, resume=run.resume, reporter=run.reporter)


def _run_cache_build(config: BaseModel, run: Run) -> dict[str, Any]:
    from distill.teachers import hf
    from distill.teachers.token_cache import verify_token_cache

    assert isinstance(config, CacheBuildJobConfig)
    directory = run.output / "teacher-cache"
    hf.build_lm_cache(
        config.teacher,
        config.data,
        directory,
        top_k=config.top_k,
        temperature=config.temperature,
        max_length=config.max_length,
        batch_size=config.batch_size,
        cache_dir=run.settings.cache_dir,
        reporter=run.reporter,
    )
    metrics = {"recipe": "cache-build", **verify_token_cache(directory)}
    (run.output / "metrics.json").write_text(json.dumps(metrics, indent=2, default=str))
    return metrics


def _run_generate(config: BaseModel, run: Run) -> dict[str, Any]:
    from distill.generate.cot import DEFAULT_COT_TEMPLATE
    from distill.generate.sample import SamplingParams, generate, read_prompts
    from distill.teachers.api import ApiTeacher

    assert isinstance(config, GenerateJobConfig)
    base_url, api_key = run.settings.teachers[config.api]
    client = ApiTeacher(
        base_url,
        config.model,
        api_key=api_key,
        concurrency=config.concurrency,
        timeout=config.timeout,
        max_retries=config.max_retries,
    )
    params = SamplingParams(
        temperature=config.temperature,
        top_p=config.top_p,
        max_tokens=config.max_tokens,
        stop=tuple(config.stop),
        seed=config.seed,
        top_logprobs=config.top_logprobs,
    )
    run.output.mkdir(parents=True, exist_ok=True)
    summary = generate(
        read_prompts(config.prompts, limit=config.limit),
        client,
        run.output / "generated.jsonl",
        config.n,
        params,
        run.reporter,
        template=config.template or (DEFAULT_COT_TEMPLATE if config.cot else None),
        endpoint=config.endpoint,
    )
    metrics = {"recipe": "generate", **asdict(summary), "path": "generated.jsonl", "rate": summary.rate}
    (run.output / "metrics.json").write_text(json.dumps(metrics, indent=2, default=str))
    return metrics


def _run_evaluate(config: BaseModel, run: Run) -> dict[str, Any]:
    from distill.service.evaluation import evaluate_saved

    assert isinstance(config, EvaluateJobConfig)
    return evaluate_saved(config, run.output, run.reporter)


@dataclass(frozen=True)
class Kind:
    model: Callable[[dict[str, Any]], tuple[type[BaseModel], dict[str, Any]]]  # the config model for a raw config
    models: str  # which model folders its model fields take: "array" (model.json) or "hf" (config.json)
    run: Callable[[BaseModel, Run], dict[str, Any]]
    check: Callable[[BaseModel, Settings], None] | None = None


def _fixed(model: type[BaseModel]) -> Callable[[dict[str, Any]], tuple[type[BaseModel], dict[str, Any]]]:
    return lambda raw: (model, raw)


KINDS: dict[str, Kind] = {
    "recipe": Kind(_recipe_model, "hf", _run_recipe, _check_recipe),
    "train": Kind(_fixed(TrainJobConfig), "array", _run_train),
    "train-lm": Kind(_fixed(LMJobConfig), "hf", _run_train_lm),
    "cache-build": Kind(_fixed(CacheBuildJobConfig), "hf", _run_cache_build),
    "generate": Kind(_fixed(GenerateJobConfig), "hf", _run_generate, _check_generate),
    "evaluate": Kind(_fixed(EvaluateJobConfig), "array", _run_evaluate),
}


def parse(kind: str, raw: Any, settings: Settings, resolver: Resolver) -> BaseModel:
    """The validated config of a job, ids resolved to paths; ServiceError 422 naming the field otherwise."""
    if kind not in KINDS:
        raise ServiceError(422, f"kind: unknown job kind {kind!r}; choose one of {', '.join(KINDS)}", param="kind")
    if not isinstance(raw, dict):
        raise ServiceError(422, "config: must be a JSON object", param="config")
    spec = KINDS[kind]
    model, raw = spec.model(raw)
    resolved = resolve(model, raw, resolver, models=spec.models)
    try:
        config = model.model_validate(resolved)
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(["config", *(str(p) for p in first["loc"])])
        others = f" (and {len(error.errors()) - 1} more)" if len(error.errors()) > 1 else ""
        message = first["msg"].removeprefix("Value error, ")  # a validator's own sentence, as the CLI shows it
        raise ServiceError(422, f"{where}: {message}{others}", param=where) from None
    if spec.check is not None:
        spec.check(config, settings)
    return config


def run(kind: str, config: BaseModel, job: Run) -> dict[str, Any]:
    """Run a parsed job; returns its metrics (the library also writes them into the output folder)."""
    return KINDS[kind].run(config, job)
