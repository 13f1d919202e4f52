"""Experiment trackers (TensorBoard, MLflow, Weights & Biases) fed from the progress the training loop reports.

`TrackingReporter` wraps the reporter a command shows and passes every call on to it; on the way, it logs to each
tracker named by the config's `train.report_to` (a recipe with several train sections, such as `teacher_train`
and `student_train`, reports to the union of theirs: `report_to_of`):

- every optimizer step, the step's loss (the loop's `advance(steps, loss=...)`) as `{run}/loss`, at the step;
- every epoch, each number of the epoch's record (`event("epoch", run=..., **record)`: the loss terms, the learning
  rate, the test metrics) as `{run}/epoch/{key}`, at the record's step;
- at the start, the resolved config as parameters (`train.lr`, `loss.temperature`...); at the end, the numbers of
  the run's metrics as `final/...` (the history left out: it is what the steps and epochs already logged).

`{run}` is the name the loop trains under (`student`, `teacher-0`, ...), so the stages of a recipe keep apart.
Where each tracker writes comes from `TrackerSettings`, which the CLI fills (it alone reads the environment):
TensorBoard event files in OUTPUT/trackers/tensorboard, MLflow into its tracking URI (a local file store in
OUTPUT/trackers/mlruns unless the user set one), W&B in offline mode into OUTPUT/trackers/wandb unless the user
configured it. A resumed run continues the MLflow and W&B runs it started (their ids are kept in
OUTPUT/trackers/runs.json). Each tracker is an optional extra (`pip install 'distill[track]'`): naming one that is
not installed is a DistillError before anything trains.
"""

from __future__ import annotations

import json
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

from pydantic import BaseModel

from distill.config import TrainConfig
from distill.errors import DistillError
from distill.progress import Reporter

TRACKERS = ("tensorboard", "mlflow", "wandb")
PACKAGES = {"tensorboard": "tensorboard", "mlflow": "mlflow-skinny", "wandb": "wandb"}
MAX_PARAM_CHARS = 500  # a parameter's value as text, cut (MLflow takes up to 6,000)
MAX_FINAL = 1_000  # numbers of the final metrics logged
_NOT_IN_NAMES = re.compile(r"[^\w.\- /:]")  # what MLflow refuses in a metric's or parameter's name


@dataclass(frozen=True)
class TrackerSettings:
    """Where and as what the trackers record a run (filled by the CLI, which reads the user's environment)."""

    directory: Path  # OUTPUT/trackers
    run_name: str  # the run's name in every tracker (the output folder's name)
    project: str  # the W&B project and the MLflow experiment
    mlflow_uri: str | None = None  # None: a local file store in directory/mlruns
    wandb_mode: Literal["online", "offline", "disabled", "shared"] | None = (
        "offline"  # None: what the user configured (WANDB_MODE, wandb login)
    )
    resume: bool = False  # continue the MLflow and W&B runs recorded in directory/runs.json


class Tracker(Protocol):
    run_id: str | None  # what a resumed run continues (None: nothing to continue)

    def scalars(self, run: str, values: dict[str, float], step: int) -> None: ...

    def params(self, values: dict[str, str]) -> None: ...

    def summary(self, values: dict[str, float]) -> None: ...

    def close(self, status: str) -> None: ...


class TensorBoardTracker:
    """Scalars into TensorBoard event files (torch's SummaryWriter); the config as a text panel."""

    def __init__(self, settings: TrackerSettings, previous: str | None = None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.run_id: str | None = None  # TensorBoard appends to the same folder: nothing to continue
        self.writer = SummaryWriter(str(settings.directory / "tensorboard"))
        self.final_step = 0

    def scalars(self, run: str, values: dict[str, float], step: int) -> None:
        for key, value in values.items():
            self.writer.add_scalar(f"{run}/{key}", value, step)
        self.final_step = max(self.final_step, step)

    def params(self, values: dict[str, str]) -> None:
        self.writer.add_text("config", "\n".join(f"    {key}: {value}" for key, value in values.items()))

    def summary(self, values: dict[str, float]) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, self.final_step)

    def close(self, status: str) -> None:
        self.writer.close()


class MlflowTracker:
    """A run of the project's experiment through MLflow's client (no global active run); metrics go out in
    batches of up to 200 (one request, or one write, for many steps)."""

    def __init__(self, settings: TrackerSettings, previous: str | None = None) -> None:
        from mlflow.tracking import MlflowClient

        uri = settings.mlflow_uri or (settings.directory / "mlruns").resolve().as_uri()
        self.client = MlflowClient(tracking_uri=uri)
        if previous is not None:
            self.client.update_run(previous, status="RUNNING")
            self.run_id: str | None = previous
        else:
            found = self.client.get_experiment_by_name(settings.project)
            experiment = found.experiment_id if found else self.client.create_experiment(settings.project)
            self.run_id = self.client.create_run(experiment, run_name=settings.run_name).info.run_id
        self.pending: list[Any] = []

    def scalars(self, run: str, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.pending += [Metric(f"{run}/{key}", value, now, step) for key, value in values.items()]
        if len(self.pending) >= 200:
            self._flush()

    def params(self, values: dict[str, str]) -> None:
        from mlflow.entities import Param

        items = [Param(key, value) for key, value in values.items()]
        for start in range(0, len(items), 100):  # MLflow takes at most 100 parameters a batch
            self.client.log_batch(str(self.run_id), params=items[start : start + 100])

    def summary(self, values: dict[str, float]) -> None:
        self.scalars("final", {key.removeprefix("final/"): value for key, value in values.items()}, 0)
        self._flush()

    def close(self, status: str) -> None:
        self._flush()
        self.client.set_terminated(
            str(self.run_id), status={"finished": "FINISHED", "killed": "KILLED"}.get(status, "FAILED")
        )

    def _flush(self) -> None:
        for start in range(0, len(self.pending), 1000):  # MLflow takes at most 1,000 metrics a batch
            self.client.log_batch(str(self.run_id), metrics=self.pending[start : start + 1000])
        self.pending = []


class WandbTracker:
    """A W&B run (offline unless the user configured W&B); each training run's figures on its own step axis."""

    def __init__(self, settings: TrackerSettings, previous: str | None = None) -> None:
        import wandb

        settings.directory.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(
            project=settings.project, name=settings.run_name, dir=str(settings.directory), mode=settings.wandb_mode,
            id=previous, resume="allow" if previous else None, settings=wandb.Settings(silent=True, console="off"),
        )  # fmt: skip
        self.run_id: str | None = self.run.id
        self.axes: set[str] = set()

    def scalars(self, run: str, values: dict[str, float], step: int) -> None:
        if run not in self.axes:  # W&B's own step only grows: each training run gets its step as its x axis
            self.run.define_metric(f"{run}/*", step_metric=f"{run}/step")
            self.axes.add(run)
        self.run.log({**{f"{run}/{key}": value for key, value in values.items()}, f"{run}/step": step})

    def params(self, values: dict[str, str]) -> None:
        self.run.config.update(values, allow_val_change=True)

    def summary(self, values: dict[str, float]) -> None:
        self.run.summary.update(values)

    def close(self, status: str) -> None:
        self.run.finish(exit_code=0 if status == "finished" else 1)


OPEN: dict[str, type[TensorBoardTracker] | type[MlflowTracker] | type[WandbTracker]] = {
    "tensorboard": TensorBoardTracker,
    "mlflow": MlflowTracker,
    "wandb": WandbTracker,
}


def report_to_of(config: BaseModel) -> list[str]:
    """The trackers a config names: the union of `report_to` over every train section in it (in TRACKERS order)."""
    named: set[str] = set()

    def visit(value: Any) -> None:
        if isinstance(value, TrainConfig):
            named.update(value.report_to)
        elif isinstance(value, BaseModel):
            for field in type(value).model_fields:
                visit(getattr(value, field))
        elif isinstance(value, list | tuple):
            for item in value:
                visit(item)

    visit(config)
    return [name for name in TRACKERS if name in named]


def check_installed(names: list[str]) -> None:
    """A DistillError naming the first tracker that is unknown or whose package is not installed."""
    for name in names:
        if name not in OPEN:
            raise DistillError(f"unknown tracker {name!r} in train.report_to; choose from {', '.join(TRACKERS)}")
        try:
            if name == "tensorboard":
                import tensorboard  # noqa: F401
                from torch.utils.tensorboard import SummaryWriter  # noqa: F401
            elif name == "mlflow":
                from mlflow.tracking import MlflowClient  # noqa: F401
            else:
                import wandb  # noqa: F401
        except ImportError:
            raise DistillError(
                f"train.report_to names {name}, which is not installed here; pip install 'distill[track]' "
                f"(or {PACKAGES[name]})"
            ) from None


def open_trackers(names: list[str], settings: TrackerSettings) -> dict[str, Tracker]:
    """The named trackers, started (continuing the runs in runs.json when `settings.resume`); a DistillError when
    one is not installed or cannot start (those already started are closed)."""
    check_installed(names)
    record = settings.directory / "runs.json"
    previous = json.loads(record.read_text()) if settings.resume and record.is_file() else {}
    opened: dict[str, Tracker] = {}
    for name in names:
        try:
            opened[name] = OPEN[name](settings, previous.get(name))
        except Exception as error:  # a tracker's own failure (a refused URI, a store it cannot write...)
            for tracker in opened.values():
                tracker.close("failed")
            lines = str(error).strip().splitlines()
            raise DistillError(
                f"{name} could not start: {(lines[0] if lines else type(error).__name__)[:300]}"
            ) from None
    if opened:
        settings.directory.mkdir(parents=True, exist_ok=True)
        ids = {name: tracker.run_id for name, tracker in opened.items() if tracker.run_id is not None}
        record.write_text(json.dumps(ids))
    return opened


class TrackingReporter:
    """A Reporter that passes every call on to `inner` and logs the training figures to `trackers` (see the
    module docstring); `start` logs the config, `finish` the final metrics and closes the trackers."""

    def __init__(self, inner: Reporter, trackers: dict[str, Tracker]) -> None:
        self.inner, self.trackers = inner, trackers
        self.stage_name, self.steps = "", 0

    def stage(self, name: str, total: int | None = None) -> None:
        self.stage_name, self.steps = _name(name), 0
        self.inner.stage(name, total)

    def advance(self, steps: int = 1, **metrics: float) -> None:
        self.steps += steps  # a resumed training run first advances by the steps it had done
        if "loss" in metrics:
            self._log(self.stage_name, {"loss": float(metrics["loss"])}, self.steps)
        self.inner.advance(steps, **metrics)

    def event(self, kind: str, **data: Any) -> None:
        if kind == "epoch":
            numbers = {
                f"epoch/{_name(k)}": float(v)
                for k, v in data.items()
                if k not in ("run", "epoch", "step") and _number(v)
            }
            self._log(_name(str(data.get("run", self.stage_name))), numbers, int(data.get("step", self.steps)))
        self.inner.event(kind, **data)

    def end(self) -> None:
        self.inner.end()

    def cancelled(self) -> bool:
        return self.inner.cancelled()

    def start(self, config: BaseModel) -> None:
        """The resolved config as every tracker's parameters."""
        if self.trackers:
            params = {
                _name(k): json.dumps(v) if isinstance(v, list) else str(v)
                for k, v in _flat(config.model_dump(mode="json"), ".").items()
            }
            params = {k: v[:MAX_PARAM_CHARS] for k, v in params.items()}
            for tracker in self.trackers.values():
                tracker.params(params)

    def finish(self, metrics: dict[str, Any] | None, status: str = "finished") -> None:
        """The numbers of the run's metrics (not its history) as `final/...`, then every tracker closed."""
        if metrics is not None and self.trackers:
            numbers = {f"final/{_name(k)}": float(v) for k, v in _flat(metrics, "/").items() if _number(v)}
            final = dict(list(numbers.items())[:MAX_FINAL])
            for tracker in self.trackers.values():
                tracker.summary(final)
        for tracker in self.trackers.values():
            tracker.close(status)
        self.trackers = {}

    def _log(self, run: str, values: dict[str, float], step: int) -> None:
        if values:
            for tracker in self.trackers.values():
                tracker.scalars(run, values, step)


def _flat(value: dict[str, Any], separator: str, prefix: str = "") -> dict[str, Any]:
    """Nested dicts as one level, keys joined by `separator`; `history` lists left out."""
    out: dict[str, Any] = {}
    for key, item in value.items():
        name = f"{prefix}{key}"
        if isinstance(item, dict):
            out.update(_flat(item, separator, name + separator))
        elif key != "history":
            out[name] = item
    return out


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _name(text: str) -> str:
    """A name every tracker accepts (MLflow's rule: letters, digits, _ - . / : and spaces)."""
    return _NOT_IN_NAMES.sub("_", text)
