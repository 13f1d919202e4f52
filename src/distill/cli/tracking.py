"""Trackers for the commands that train (`run`, `train`, `train-lm`): `tracked` wraps a command's progress bars in
the `TrackingReporter` of the trackers its config names (`train.report_to`; see `distill.trackers`), with the
settings this module reads from the user's environment, which the library never reads:

- MLflow: MLFLOW_TRACKING_URI when set, else a local file store in OUTPUT/trackers/mlruns (MLflow 3.7 and later
  keep their file store behind MLFLOW_ALLOW_FILE_STORE, which is then set for this process unless the user set it);
- W&B: what the user configured when WANDB_MODE or WANDB_API_KEY is set, else offline mode;
- the project (MLflow experiment, W&B project) is `distill-<recipe or command>`, the run's name its output folder's.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pydantic import BaseModel

from distill.progress import Cancelled, Reporter
from distill.trackers import TrackerSettings, TrackingReporter, open_trackers, report_to_of


@contextmanager
def tracked(
    bars: Reporter, config: BaseModel, output: Path, kind: str, resume: bool, enabled: bool = True
) -> Iterator[TrackingReporter]:
    """The reporter a training command runs with: `bars` and the config's trackers (none when not `enabled`,
    e.g. on processes other than the first under torchrun). The command calls `finish(metrics)` when its run
    ended well; a run that raised closes its tracker runs as failed (killed when interrupted or cancelled)."""
    names = report_to_of(config) if enabled else []
    reporter = TrackingReporter(bars, open_trackers(names, settings(output, kind, resume, names)) if names else {})
    reporter.start(config)
    status = "failed"
    try:
        yield reporter
        status = "finished"
    except (KeyboardInterrupt, Cancelled):
        status = "killed"
        raise
    finally:
        reporter.finish(None, status)  # no-op after the command's own finish(metrics)


def settings(output: Path, kind: str, resume: bool, names: list[str]) -> TrackerSettings:
    """Where the trackers of a run in `output` write, from the user's environment (see the module docstring)."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or None
    if "mlflow" in names and uri is None:
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    configured = bool(os.environ.get("WANDB_MODE") or os.environ.get("WANDB_API_KEY"))
    return TrackerSettings(output / "trackers", output.resolve().name, f"distill-{kind}", uri, None if configured else "offline",
                           resume)  # fmt: skip
