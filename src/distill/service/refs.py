"""References in a job's config: the only way a payload names data or models.

A config posted to the service is the same pydantic model the CLI reads, but where the CLI takes a path the
service takes an id, and resolves it to a path inside its data directory:

- a field typed as a path (data files, a corpus, prompts): an uploaded file's id, `file-...`;
- a model (`teacher`, `student`; a path or a model name in the CLI): a finished job's id, `job-...` for the model it
  produced (its `student/`, else its `model/`), or `job-.../NAME` for one of its other models (`models/NAME`,
  e.g. `job-.../teacher-0`); text recipes also accept the packaged `minilm-l6`; a model given with its settings
  (train-lm's `student: {model: ..., lora: ...}`) names it in `model`;
- `cache` (a teacher log-prob cache): the id of a finished `cache-build` job;
- `data_dir`: never; the service passes its own reference data sets folder.

Anything else (an absolute or relative path, a hub name, `..`) is refused with 422 naming the field, so no payload
can read a path outside the data directory. Resolution happens when the job is created (to answer 422 at once) and
again in the worker, from the ids stored with the job.
"""

from __future__ import annotations

import re
from pathlib import Path
from types import UnionType
from typing import Any, Union, get_args, get_origin

from pydantic import BaseModel
from sqlalchemy import Engine, select

from distill.service import db
from distill.service.errors import ServiceError
from distill.service.files import stored_path
from distill.service.settings import Settings

FILE_ID = re.compile(r"^file-[0-9a-f]{24}$")
JOB_REF = re.compile(r"^(job-[0-9a-f]{24})(?:/([a-z0-9][a-z0-9_-]{0,63}))?$")
BUILTIN_MODELS = ("minilm-l6",)
MODEL_FIELDS = ("teacher", "student")  # model names (strings) or saved model folders (paths)


def job_output(settings: Settings, job_id: str) -> Path:
    """A job's output folder: `<data_dir>/jobs/<id>/output`."""
    return settings.jobs_dir / job_id / "output"


def model_folder(output: Path) -> Path | None:
    """The model a job produced: `student/` (distilled), else `model/` (trained alone); None when it has neither."""
    for name in ("student", "model"):
        if (output / name).is_dir():
            return output / name
    return None


def _bad(field: str, message: str) -> ServiceError:
    return ServiceError(422, f"{field}: {message}", param=field)


class Resolver:
    """Turns ids into paths inside the data directory, checking that what they name exists and is finished."""

    def __init__(self, settings: Settings, engine: Engine) -> None:
        self.settings, self.engine = settings, engine

    def file(self, value: Any, field: str) -> str:
        if not isinstance(value, str) or not FILE_ID.match(value):
            raise _bad(field, f"must be the id of an uploaded file (file-...), not {_show(value)}")
        with db.read(self.engine) as connection:
            row = connection.execute(select(db.files).where(db.files.c.id == value)).first()
        if row is None:
            raise _bad(field, f"no uploaded file with id {value!r}")
        return str(stored_path(self.settings, dict(row._mapping)).resolve())

    def _job(self, value: Any, field: str, what: str) -> tuple[str, str | None, str]:
        match = JOB_REF.match(value) if isinstance(value, str) else None
        if match is None:
            raise _bad(field, f"must be the id of a finished job (job-...) for {what}, not {_show(value)}")
        with db.read(self.engine) as connection:
            row = connection.execute(select(db.jobs.c.status, db.jobs.c.kind).where(db.jobs.c.id == match[1])).first()
        if row is None:
            raise _bad(field, f"no job with id {match[1]!r}")
        if row.status != "succeeded":
            raise _bad(field, f"job {match[1]} has not succeeded (it is {row.status})")
        return match[1], match[2], row.kind

    def model(self, value: Any, field: str, expect: str) -> str:
        """A model folder; `expect` is `array` (model.json of the built-in families), `hf` (config.json) or `any`
        (either)."""
        if expect == "hf" and value in BUILTIN_MODELS:
            return str(value)
        job_id, name, _ = self._job(value, field, "its model")
        output = job_output(self.settings, job_id)
        folder = output / "models" / name if name else model_folder(output)
        if folder is None or not folder.is_dir():
            raise _bad(field, f"job {job_id} has no model {name or ''}".rstrip())
        markers = {"array": ("model.json",), "hf": ("config.json",), "any": ("model.json", "config.json")}[expect]
        if not any((folder / marker).is_file() for marker in markers):
            kind = {"array": "a built-in MLP/CNN", "hf": "a Hugging Face model folder", "any": "a model"}[expect]
            raise _bad(field, f"{value} is not {kind} (no {' or '.join(markers)})")
        return str(folder.resolve())

    def cache(self, value: Any, field: str) -> str:
        job_id, _, kind = self._job(value, field, "a teacher log-prob cache")
        folder = job_output(self.settings, job_id) / "teacher-cache"
        if kind != "cache-build" or not folder.is_dir():
            raise _bad(field, f"job {job_id} is a {kind} job, not a cache-build job")
        return str(folder.resolve())


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _is_path(annotation: Any) -> bool:
    return annotation is Path or any(_is_path(a) for a in get_args(annotation))


def _is_str(annotation: Any) -> bool:
    """`str`, or a union with `str` in it (`str | None`); not a container of strings (`dict[str, int]`)."""
    return annotation is str or (get_origin(annotation) in (Union, UnionType) and str in get_args(annotation))


def _nested(annotation: Any) -> type[BaseModel] | None:
    for candidate in (annotation, *get_args(annotation)):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def resolve(model: type[BaseModel], data: Any, resolver: Resolver, *, models: str, prefix: str = "config") -> Any:
    """A copy of the raw config `data` with every id resolved to a path, following `model`'s fields (nested
    sections included); `models` says which kind of model folder its model fields take (`array` or `hf`)."""
    if not isinstance(data, dict):
        return data  # pydantic reports the wrong type
    out = dict(data)
    for name, info in model.model_fields.items():
        value = out.get(name)
        if value is None:
            continue
        field = f"{prefix}.{name}"
        annotation = info.annotation
        nested = _nested(annotation)
        if nested is not None and isinstance(value, dict):
            out[name] = resolve(nested, value, resolver, models=models, prefix=field)
            if name in MODEL_FIELDS and "model" in nested.model_fields and value.get("model") is not None:
                out[name]["model"] = resolver.model(value["model"], f"{field}.model", models)  # {model: ID, lora: ..}
        elif nested is not None and isinstance(value, list):  # a list of sections (e.g. an evaluate job's tasks)
            out[name] = [
                resolve(nested, v, resolver, models=models, prefix=f"{field}.{i}") for i, v in enumerate(value)
            ]
        elif name == "data_dir" and _is_path(annotation):
            raise _bad(field, "is set by the service (its reference data sets), not by a job")
        elif name == "cache" and _is_path(annotation):
            out[name] = resolver.cache(value, field)
        elif name in MODEL_FIELDS and (_is_path(annotation) or _is_str(annotation)):
            if isinstance(value, list):
                out[name] = [resolver.model(v, f"{field}.{i}", models) for i, v in enumerate(value)]
            else:
                out[name] = resolver.model(value, field, models)
        elif _is_path(annotation):
            if isinstance(value, list):
                out[name] = [resolver.file(v, f"{field}.{i}") for i, v in enumerate(value)]
            else:
                out[name] = resolver.file(value, field)
    return out
