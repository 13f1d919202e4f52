"""Data sets read through Hugging Face `datasets`: local parquet, Arrow, JSON and CSV files, folders written by
`Dataset.save_to_disk` (or holding such files), and data sets on the Hugging Face Hub named `org/name`.

A Hub id may name a split, `org/name:split`, or a configuration and a split, `org/name:config:split` (the default
split is `train`); it is read only when the machine is online (`datasets` is told so by HF_HUB_OFFLINE or
HF_DATASETS_OFFLINE), and otherwise refused with a line that says so. Rows come out as plain dicts without their
missing (None) values, so a column that only some rows fill (`text` beside `prompt`/`completion`) reads as the same
rows a JSONL file holds. `datasets` is imported only when one of these sources is read: JSONL stays on its own fast
reader (`distill.data.json_lines`).
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distill.errors import DataError

FILE_KINDS = {".parquet": "parquet", ".arrow": "arrow", ".csv": "csv", ".json": "json"}  # suffix -> datasets builder
NOT_HUB = (".jsonl", ".txt", ".tsv", ".npz", ".gz", ".zst", ".yaml", ".yml")  # missing files, not Hub ids
_NAME = r"[A-Za-z0-9][\w.-]*"
HUB_ID = re.compile(rf"^({_NAME}/{_NAME})(?::({_NAME}))?(?::({_NAME}))?$")
OFFLINE = (
    "is not a file or folder here, and this machine is offline, so it cannot be read from the Hugging Face Hub "
    "(unset HF_HUB_OFFLINE / HF_DATASETS_OFFLINE where the network is reachable, or give a local file)"
)


@dataclass(frozen=True)
class HubId:
    """A data set on the Hugging Face Hub: its repository, configuration (None: the default) and split."""

    name: str
    config: str | None = None
    split: str = "train"

    def __str__(self) -> str:
        return f"{self.name}" + (f" ({self.config})" if self.config else "") + f", split {self.split}"


def hub_id(source: str) -> HubId | None:
    """`org/name`, `org/name:split` or `org/name:config:split` as a HubId; None for anything else."""
    match = HUB_ID.match(source)
    if match is None or Path(source).suffix.lower() in (*FILE_KINDS, *NOT_HUB):
        return None
    name, first, second = match.groups()
    return HubId(name, first, second) if second else HubId(name, None, first or "train")


def through_datasets(source: Path | str) -> bool:
    """Whether `source` is read by `datasets` (a parquet/Arrow/JSON/CSV file, a folder, a Hub id), not as JSONL."""
    path = Path(source)
    if path.is_dir() or path.suffix.lower() in FILE_KINDS:
        return True
    return not path.exists() and hub_id(str(source)) is not None


def online() -> bool:
    """Whether `datasets` may reach the Hugging Face Hub (neither HF_HUB_OFFLINE nor HF_DATASETS_OFFLINE is set)."""
    import datasets

    return not datasets.config.HF_HUB_OFFLINE


def dataset_rows(source: Path | str, split: str | None = None) -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, row) for each row of a file, folder or Hub data set, `where` naming it ("row 3 of FILE"); a row is
    a dict of its columns without those it leaves empty (None)."""
    dataset, label = load(source, split)
    for number, row in enumerate(dataset, start=1):
        yield f"row {number} of {label}", {key: value for key, value in row.items() if value is not None}


def hub_columns(hub: HubId, columns: Sequence[str]) -> dict[str, list[Any]]:
    """The named columns of a split of a Hub data set (online only); a DataError naming a missing column."""
    dataset = _from_hub(hub)
    missing = [c for c in columns if c not in dataset.column_names]
    if missing:
        have = ", ".join(dataset.column_names) or "none"
        raise DataError(f"{hub} has no column {missing[0]!r} (columns: {have})")
    return {c: list(dataset[c]) for c in columns}


def load(source: Path | str, split: str | None = None) -> tuple[Any, str]:
    """(the `datasets.Dataset`, how errors name it) of a file, a folder or a Hub id; a DataError otherwise."""
    path = Path(source)
    if path.is_dir():
        return _from_folder(path, split), str(path)
    if path.is_file():
        kind = FILE_KINDS.get(path.suffix.lower())
        if kind is None:
            raise DataError(f"{path}: read as JSONL or text, not through datasets (its suffix is not one of theirs)")
        if split not in (None, "train"):
            raise DataError(f"{path} is one file, one split: a split ({split}) applies to Hub ids and folders")
        with _reading(path, kind):
            return _quiet_load(kind, data_files=str(path), split="train"), str(path)
    hub = hub_id(str(source))
    if hub is None:
        raise DataError(f"data file {path} does not exist")
    if split is not None:
        hub = HubId(hub.name, hub.config, split)
    return _from_hub(hub), str(hub)


def _from_folder(path: Path, split: str | None) -> Any:
    """A folder written by `save_to_disk` (a Dataset, or a DatasetDict and one of its splits), or a folder of data
    files (`load_dataset` on it, as on a Hub repository downloaded by hand)."""
    import datasets

    saved = (path / "state.json").is_file() or (path / "dataset_dict.json").is_file()
    with _reading(path, "a saved dataset" if saved else "a folder of data files"):
        if not saved:
            return _quiet_load(str(path), split=split or "train")
        loaded = datasets.load_from_disk(str(path))
    if isinstance(loaded, datasets.DatasetDict):
        chosen = split or "train"
        if chosen not in loaded:
            raise DataError(f"{path} has no split {chosen!r} (splits: {', '.join(loaded) or 'none'})")
        return loaded[chosen]
    if split not in (None, "train"):
        raise DataError(f"{path} holds one Dataset, not splits: a split ({split}) applies to a saved DatasetDict")
    return loaded


def _from_hub(hub: HubId) -> Any:
    import datasets

    if not online():
        raise DataError(f"{hub.name} {OFFLINE}")
    try:
        with _quiet():
            return datasets.load_dataset(hub.name, hub.config, split=hub.split)
    except datasets.exceptions.DatasetNotFoundError:
        raise DataError(f"{hub.name}: no such data set on the Hugging Face Hub (or it is private)") from None
    except ConnectionError:
        raise DataError(f"{hub.name} {OFFLINE}") from None
    except (ValueError, FileNotFoundError, datasets.exceptions.DatasetsError) as error:
        raise DataError(f"{hub}: {_first_line(error)}") from None


@contextmanager
def _reading(path: Path, kind: str) -> Iterator[None]:
    """A local file or folder that `datasets` cannot read becomes one DataError naming it and the reason."""
    import datasets
    import pyarrow

    try:
        yield
    except (OSError, ValueError, pyarrow.ArrowException, datasets.exceptions.DatasetsError) as error:
        raise DataError(f"{path} could not be read as {kind} ({_first_line(error)})") from None


def _quiet_load(*args: Any, **kwargs: Any) -> Any:
    import datasets

    with _quiet():
        return datasets.load_dataset(*args, **kwargs)


@contextmanager
def _quiet() -> Iterator[None]:
    """`datasets` without its progress bars and log lines (the library reports through its Reporter; a failure
    becomes the DataError raised here, so datasets' own error log would say it twice)."""
    from datasets.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars
    from datasets.utils import logging as datasets_logging

    was_disabled, verbosity = are_progress_bars_disabled(), datasets_logging.get_verbosity()
    disable_progress_bars()
    datasets_logging.set_verbosity(datasets_logging.CRITICAL)
    try:
        yield
    finally:
        datasets_logging.set_verbosity(verbosity)
        if not was_disabled:
            enable_progress_bars()


def _first_line(error: BaseException) -> str:
    """The first line of an exception's message (its type when it has none), cut to 300 characters."""
    lines = str(error).strip().splitlines()
    return (lines[0] if lines else type(error).__name__)[:300]
