"""One config path: the CLI (a config file plus `--set` overrides, as `distill run`/`train`/`train-lm` read them) and
the service (a job's payload, ids resolved to paths; the dashboard's form goes through the same `kinds.parse`)
resolve the same partial configs to identical full configs, for every recipe and every job kind."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from _service import finished_job
from conftest import tiny_gpt2
from distill import config as cfg
from distill.recipes import RECIPES
from distill.service import db, files, kinds
from distill.service.refs import Resolver
from distill.service.settings import Settings

# For every recipe: partial configs a user would write; each leaves most settings to the recipe.
RECIPE_CASES: dict[str, list[dict[str, Any]]] = {
    "mnist1d": [
        {},
        {"student_train": {"epochs": 3}},
        {"epochs": 4, "teacher_epochs": 2, "student_width": 64, "loss": {"alpha": 0.5}},
        {"teacher": {"width": 32}, "teachers": 3, "ensemble": "geometric", "seed": 7},
    ],
    "digits": [{}, {"loss": {"temperature": 3}}, {"student_train": {"lr": 0.01}, "transfer_size": 100}],
    "stsb": [{}, {"train": {"epochs": 2}}, {"students": [2], "ablation": False, "hidden_weight": 0.5}],
    "sst2": [{}, {"student_train": {"epochs": 3}}, {"bilstm_train": {"batch_size": 16}, "loss": {"alpha": 0.7}}],
    "lm": [{}, {"teacher": {"layers": 2}}, {"student_train": {"epochs": 1}, "loss": {"chunk_size": 512}}],
    "reasoning": [{}, {"teacher_train": {"epochs": 6}}, {"student": {"width": 32, "heads": 4}, "token_kd": 0}],
}


@pytest.fixture
def service(tmp_path):
    settings = Settings(data_dir=tmp_path / "data", datasets_dir=tmp_path).prepare()
    engine = db.open_engine(settings.url, pool_size=2)
    db.ensure_schema(engine)
    yield settings, engine
    engine.dispose()


def cli_resolve(model: type, partial: dict[str, Any], tmp_path: Path, overrides: list[str] = ()) -> Any:
    """What the CLI does with `--config FILE --set ...`."""
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(partial))
    return cfg.load(model, path, list(overrides))


def service_resolve(kind: str, partial: dict[str, Any], service: tuple[Settings, Any]) -> Any:
    settings, engine = service
    return kinds.parse(kind, json.loads(json.dumps(partial)), settings, Resolver(settings, engine))


@pytest.mark.parametrize("name", list(RECIPES))
def test_every_recipe_resolves_the_same_on_the_cli_and_the_service(name, service, tmp_path):
    recipe = RECIPES[name]
    for partial in RECIPE_CASES[name]:
        from_cli = cli_resolve(recipe.config, {"recipe": name, **partial}, tmp_path)
        from_service = service_resolve("recipe", {"recipe": name, **partial}, service)
        assert from_cli.model_dump() == from_service.model_dump(), (name, partial)
        assert from_cli.model_dump() != cfg.resolve(recipe.config, {}).model_dump() or not partial, (name, partial)


def test_the_issues_sst2_example_keeps_the_recipes_student_settings(service, tmp_path):
    """`{"recipe": "sst2", "student_train": {"epochs": 3}}` used to train with batch 256, lr 3e-3, one-cycle from
    the service (TrainConfig's defaults) and batch 32, lr 1e-4, cosine from the CLI."""
    partial = {"recipe": "sst2", "student_train": {"epochs": 3}}
    for config in (cli_resolve(RECIPES["sst2"].config, partial, tmp_path), service_resolve("recipe", partial, service)):
        train = config.student_train
        assert (train.epochs, train.batch_size, train.lr, train.schedule) == (3, 32, 1e-4, "cosine")
    flags = cfg.load(RECIPES["sst2"].config, None, ["recipe=sst2", "student_train.epochs=3"])  # `--epochs 3`
    assert flags.model_dump() == service_resolve("recipe", partial, service).model_dump()


def upload(service: tuple[Settings, Any], name: str, content: bytes) -> tuple[str, str]:
    """(the file's id, the path the service keeps it at)."""
    settings, engine = service
    record = files.store_upload(settings, engine, io.BytesIO(content), name, "train", "local")
    return record["id"], str(files.stored_path(settings, record).resolve())


def test_every_job_kind_resolves_the_same_on_the_cli_and_the_service(service, tmp_path):
    settings, _ = service
    csv_id, csv = upload(service, "rows.csv", b"a,b,label\n1,2,0\n3,4,1\n")
    jsonl_id, jsonl = upload(service, "rows.jsonl", b'{"prompt": "a", "completion": "b"}\n')
    lm_job, lm_output = finished_job(settings.data_dir, {"recipe": "lm"})
    tiny_gpt2(lm_output / "student")
    lm = str((lm_output / "student").resolve())
    array_job, array_output = finished_job(settings.data_dir)
    (array_output / "student").mkdir()
    (array_output / "student" / "model.json").write_text("{}")
    array = str((array_output / "student").resolve())
    settings = Settings(data_dir=settings.data_dir, teachers={"teacher": ("http://127.0.0.1:9/v1", None)})
    service = (settings, service[1])
    cases = [  # (kind, the job's payload, the same config as the CLI takes it: paths instead of ids)
        ("train", {"data": {"train": csv_id}, "train": {"epochs": 2}}, {"data": {"train": csv}, "train": {"epochs": 2}}),
        ("train", {"data": {"train": csv_id}, "teacher": array_job, "loss": {"alpha": 0.3}},
         {"data": {"train": csv}, "teacher": [array], "loss": {"alpha": 0.3}}),
        ("train-lm", {"student": lm_job, "teacher": lm_job, "data": jsonl_id, "train": {"lr": 1e-4}},
         {"student": lm, "teacher": lm, "data": jsonl, "train": {"lr": 1e-4}}),
        ("cache-build", {"teacher": lm_job, "data": jsonl_id, "top_k": 8}, {"teacher": lm, "data": jsonl, "top_k": 8}),
        ("generate", {"api": "teacher", "model": "m", "prompts": jsonl_id, "n": 4},
         {"api": "teacher", "model": "m", "prompts": jsonl, "n": 4}),
        ("evaluate", {"student": array_job, "data": csv_id}, {"student": array, "data": csv}),
    ]  # fmt: skip
    seen = set()
    for kind, payload, as_cli in cases:
        model = kinds.KINDS[kind].model(payload)[0]
        from_service = service_resolve(kind, payload, service).model_dump(mode="json")
        assert cli_resolve(model, as_cli, tmp_path).model_dump(mode="json") == from_service, kind
        seen.add(kind)
    assert seen == set(kinds.KINDS) - {"recipe"}


def test_the_cli_options_of_generate_and_cache_build_are_their_models_fields():
    """Each option that tunes `distill generate` or `distill cache build` is a field of the model the service's job
    validates with (its default and bounds written once, there)."""
    from typer.main import get_command

    from distill.cli import app

    command = get_command(app)
    served = {"base_url", "model", "student", "api_key_env"}  # cache build --base-url: where the teacher is
    for path, models, own in (
        (
            ["generate"],
            [cfg.GenerateOptions],
            {"prompts", "output", "base_url", "model", "api_key_env", "estimate", "estimate_prompts"},
        ),
        (
            ["cache", "build"],
            [cfg.CacheBuildOptions, cfg.ServedCacheOptions],
            {"teacher", "data", "directory"} | served,
        ),
    ):
        target = command
        for part in path:
            target = target.commands[part]  # type: ignore[attr-defined]
        fields = set().union(*(model.model_fields for model in models))
        options = {p.name for p in target.params} - own - {"help"}
        assert options == fields, path
        assert all(p.default in (None, False, [], ()) for p in target.params if p.name in fields), path
