"""Progress reporting: the one channel through which library code tells the outside world how far it is.

Library functions take a `Reporter` and never print. The CLI passes a reporter that draws rich progress bars; the
service passes one that stores events for the job (and whose `cancelled` lets a user stop the job).
"""

from __future__ import annotations

from typing import Any, Protocol


class Cancelled(Exception):
    """Raised inside a long operation when its reporter says the user cancelled it."""


class Reporter(Protocol):
    def stage(self, name: str, total: int | None = None) -> None:
        """A named piece of work begins; `total` steps when known."""

    def advance(self, steps: int = 1, **metrics: float) -> None:
        """`steps` more steps are done; `metrics` are the latest figures (loss, rate...)."""

    def event(self, kind: str, **data: Any) -> None:
        """Something worth recording happened (an epoch's metrics, a checkpoint, a message)."""

    def end(self) -> None:
        """The current stage is finished."""

    def cancelled(self) -> bool:
        """True when the user asked to stop; long loops check it at every step."""


class NullReporter:
    """Reports nothing and is never cancelled."""

    def stage(self, name: str, total: int | None = None) -> None:
        pass

    def advance(self, steps: int = 1, **metrics: float) -> None:
        pass

    def event(self, kind: str, **data: Any) -> None:
        pass

    def end(self) -> None:
        pass

    def cancelled(self) -> bool:
        return False


class RecordingReporter(NullReporter):
    """Keeps every event in a list (tests, the Python API's return value)."""

    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []
        self.stages: list[str] = []

    def stage(self, name: str, total: int | None = None) -> None:
        self.stages.append(name)

    def event(self, kind: str, **data: Any) -> None:
        self.events.append((kind, data))


NULL: Reporter = NullReporter()
