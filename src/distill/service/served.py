"""The models the service serves, by model id: a finished job's model (`job-...`, `job-.../NAME`) or a deployment's
cascade, loaded on first use and kept (at most `capacity` of them; the least recently used leave)."""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, select

from distill.service import cascade, cascade_lm, db
from distill.service.errors import ServiceError
from distill.service.refs import JOB_REF, job_output, model_folder
from distill.service.settings import Settings


@dataclass
class Served:
    """A model id's target: a classifier (with a teacher and threshold when it is a cascade) or an LM app."""

    model_id: str
    created: int
    student: cascade.Classifier | None = None
    teacher: cascade.Classifier | None = None
    threshold: float | None = None
    app: Any = None  # the FastAPI app of distill.serve for a causal LM
    cascade: bool = False  # the app is an LM cascade (cascade_lm)


class LoadedModels:
    """Models loaded on first use and kept (at most `capacity` folders; the least recently used leave)."""

    def __init__(self, settings: Settings, engine: Engine, capacity: int = 8) -> None:
        self.settings, self.engine, self.capacity = settings, engine, capacity
        self._loaded: OrderedDict[str, Any] = OrderedDict()
        self._lock = threading.Lock()

    def _cached(self, key: str, load: Any) -> Any:
        with self._lock:
            if key in self._loaded:
                self._loaded.move_to_end(key)
                return self._loaded[key]
        value = load()
        with self._lock:
            self._loaded[key] = value
            while len(self._loaded) > self.capacity:
                self._loaded.popitem(last=False)
        return value

    def folder(self, model_id: str) -> tuple[Path, float] | None:
        """The folder and finish time of a job's model id, or None."""
        match = JOB_REF.match(model_id)
        if match is None:
            return None
        with db.read(self.engine) as connection:
            row = connection.execute(
                select(db.jobs.c.status, db.jobs.c.finished_at).where(db.jobs.c.id == match[1])
            ).first()
        if row is None or row.status != "succeeded":
            return None
        output = job_output(self.settings, match[1])
        folder = output / "models" / match[2] if match[2] else model_folder(output)
        if folder is None or not ((folder / "model.json").is_file() or (folder / "config.json").is_file()):
            return None
        return folder, row.finished_at or 0.0

    def resolve(self, model_id: str) -> Served:
        with db.read(self.engine) as connection:
            deployment = connection.execute(select(db.deployments).where(db.deployments.c.id == model_id)).first()
        if deployment is not None and '"type": "lm"' in deployment.validation:
            key = f"cascade:{model_id}:{deployment.created_at}"  # a deployment made anew under the name loads anew
            app = self._cached(key, lambda: cascade_lm.app(self.settings, self.engine, deployment, self._lm_app))
            return Served(model_id, int(deployment.created_at), app=app, cascade=True)
        if deployment is not None:
            return self._classifier_cascade(model_id, deployment)
        found = self.folder(model_id)
        if found is None:
            raise ServiceError(
                404, f"the model {model_id!r} does not exist; GET /v1/models lists them", code="model_not_found"
            )
        folder, finished = found
        if (folder / "model.json").is_file():
            return Served(
                model_id, int(finished), student=self._cached(str(folder), lambda: cascade.Classifier.load([folder]))
            )
        from distill.serve import create_app

        limits = self.settings.serve_limits
        return Served(
            model_id,
            int(finished),
            app=self._cached(f"lm:{model_id}", lambda: create_app(folder, model_name=model_id, limits=limits)),
        )

    def _lm_app(self, model_id: str) -> Any:
        """The `distill.serve` app of a causal LM this service serves (an LM cascade's teacher)."""
        served = self.resolve(model_id)
        if served.app is None or served.cascade:
            raise ServiceError(
                404, f"the teacher {model_id!r} is not a causal LM of this service", code="model_not_found"
            )
        return served.app

    def _classifier_cascade(self, model_id: str, deployment: Any) -> Served:
        found = self.folder(deployment.student)
        if found is None:
            raise ServiceError(404, f"the student of deployment {model_id!r} is gone", code="model_not_found")
        job = {"id": deployment.student, "kind": "", "config": {}}
        with db.read(self.engine) as connection:
            row = connection.execute(
                select(db.jobs.c.kind, db.jobs.c.config).where(db.jobs.c.id == deployment.student)
            ).one()
        job.update(kind=row.kind, config=json.loads(row.config))
        teachers = cascade.teacher_folders(self.settings, self.engine, job)
        mode = cascade.ensemble_mode(job)  # the teacher the student was distilled from: its ensemble's combine
        return Served(
            model_id,
            int(deployment.created_at),
            student=self._cached(str(found[0]), lambda: cascade.Classifier.load([found[0]])),
            teacher=self._cached(
                mode + "|" + "|".join(map(str, teachers)), lambda: cascade.Classifier.load(teachers, mode)
            ),
            threshold=deployment.threshold,
        )

    def listing(self) -> list[dict[str, Any]]:
        with db.read(self.engine) as connection:
            finished = connection.execute(
                select(db.jobs.c.id, db.jobs.c.finished_at)
                .where(db.jobs.c.status == "succeeded")
                .order_by(db.jobs.c.finished_at.desc())
                .limit(1000)
            ).all()
            deployments = connection.execute(select(db.deployments.c.id, db.deployments.c.created_at)).all()
        cards = [card(row.id, row.finished_at) for row in finished if model_folder(job_output(self.settings, row.id))]
        return cards + [card(row.id, row.created_at, "cascade") for row in deployments]


def card(model_id: str, created: float | None, kind: str = "student") -> dict[str, Any]:
    return {"id": model_id, "object": "model", "created": int(created or 0), "owned_by": "distill", "kind": kind}
