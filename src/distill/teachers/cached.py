"""A teacher's outputs computed once, stored on disk with a manifest, and reused by every epoch and every student.

Layout of a cache directory:

    manifest.json          format, teacher id, data fingerprint, rows, width, shards with their sha256
    logprobs-00000.npy     (rows_in_shard, C) float32 log-probabilities, read memory-mapped
    ...
    partial.json           only while building: the shards finished so far (a killed build resumes from it)

written, resumed and checked as `distill.teachers.cache_files` describes. A cache answers for one teacher and one
data set: `CachedTeacher` refuses a manifest whose teacher id or data fingerprint differ from what the caller
expects, and a shard whose checksum does not match.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from distill.data import Dataset
from distill.errors import CacheError
from distill.progress import NULL, Reporter
from distill.teachers.cache_files import MANIFEST, PARTIAL, add_shard, check_file, finish, read_json, resumable_shards
from distill.teachers.protocol import Teacher, TeacherOutput

FORMAT = "distill-teacher-cache"
VERSION = 1


def build_cache(
    teacher: Teacher,
    data: Dataset,
    directory: Path,
    *,
    teacher_id: str,
    data_id: str,
    batch_size: int = 1024,
    shard_rows: int = 65_536,
    reporter: Reporter = NULL,
) -> CachedTeacher:
    """Score every row of `data` with `teacher` and store the log-probs; resume a killed build; reuse a finished one
    (the protocol of `distill.teachers.cache_files`)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    identity = {"teacher": teacher_id, "data": data_id, "rows": len(data), "width": teacher.num_classes}
    manifest_path = directory / MANIFEST
    if manifest_path.exists():
        manifest = read_json(manifest_path)
        if all(manifest.get(k) == v for k, v in identity.items()):
            return CachedTeacher(directory, teacher_id=teacher_id, data_id=data_id)
        raise CacheError(
            f"{directory} already holds a cache for another teacher or data set; choose another directory or delete it"
        )
    shards = resumable_shards(directory, identity)
    start = sum(s["rows"] for s in shards)
    total = len(data)
    reporter.stage("teacher cache", total=total)
    reporter.advance(start)
    while start < total:
        stop = min(start + shard_rows, total)
        values = _score_rows(teacher, data, start, stop, batch_size, reporter)  # (rows_in_shard, C)
        name = f"logprobs-{len(shards):05d}.npy"
        add_shard(directory, identity, shards, name, values, first_row=start, rows=stop - start)
        start = stop
    reporter.end()
    finish(directory, {"format": FORMAT, "version": VERSION, "kind": "dense", **identity, "shards": shards})
    return CachedTeacher(directory, teacher_id=teacher_id, data_id=data_id)


def _score_rows(
    teacher: Teacher, data: Dataset, start: int, stop: int, batch_size: int, reporter: Reporter
) -> np.ndarray:
    """The teacher's log-probs (stop - start, C) of rows start..stop-1, in row order."""
    rows = torch.arange(start, stop)
    lengths = getattr(data, "lengths", None)
    if isinstance(lengths, torch.Tensor):  # ragged texts: batch rows of similar length, so little is padding
        rows = rows[torch.argsort(lengths[start:stop], stable=True)]
    values = np.empty((stop - start, teacher.num_classes), np.float32)  # (rows_in_shard, C)
    for index in rows.split(batch_size):
        output = teacher(data.batch(index))
        if output.sparse or output.logprobs is None:
            raise CacheError("this cache stores dense teacher log-probs; the teacher returned top-k or none")
        values[(index - start).numpy()] = output.logprobs.float().cpu().numpy()  # (b, C)
        reporter.advance(len(index))
    return values


class CachedTeacher:
    """Serves the stored log-probs of the rows in `batch["index"]`, checked against the manifest on open."""

    def __init__(
        self, directory: Path, *, teacher_id: str | None = None, data_id: str | None = None, verify: bool = True
    ):
        self.directory = Path(directory)
        manifest_path = self.directory / MANIFEST
        if not manifest_path.exists():
            hint = " (its build did not finish; run it again to resume)" if (self.directory / PARTIAL).exists() else ""
            raise CacheError(f"{self.directory} has no {MANIFEST}: not a teacher cache{hint}")
        manifest = read_json(manifest_path)
        if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
            raise CacheError(f"{manifest_path} is not a {FORMAT} v{VERSION} manifest")
        if teacher_id is not None and manifest.get("teacher") != teacher_id:
            raise CacheError(f"cache {self.directory} was built by another teacher; rebuild it for this teacher")
        if data_id is not None and manifest.get("data") != data_id:
            raise CacheError(f"cache {self.directory} was built for other data; rebuild it for this data set")
        self.manifest = manifest
        self.num_classes = int(manifest["width"])
        arrays = []
        expected_start = 0
        for shard in manifest["shards"]:
            path = self.directory / shard["file"]
            check_file(path, shard["sha256"] if verify else None, "cache shard")
            try:
                array = np.load(path, mmap_mode="r")
            except (ValueError, OSError) as error:
                raise CacheError(f"cache shard {path} is unreadable ({error}); rebuild the cache") from None
            if shard["first_row"] != expected_start or array.shape != (shard["rows"], self.num_classes):
                raise CacheError(f"cache shard {path} has shape {array.shape}, not what the manifest says; rebuild it")
            expected_start += shard["rows"]
            arrays.append(array)
        if expected_start != manifest["rows"]:
            raise CacheError(f"cache {self.directory} covers {expected_start} of {manifest['rows']} rows; rebuild it")
        # Small caches are gathered into one tensor; the arrays stay memory-mapped until then.
        stacked = np.concatenate(arrays) if arrays else np.zeros((0, self.num_classes), np.float32)
        self.logprobs = torch.from_numpy(stacked)  # (rows, C)
        self.temperature = 1.0

    def __len__(self) -> int:
        return int(self.logprobs.shape[0])

    def at_temperature(self, temperature: float) -> CachedTeacher:
        """The same cache serving log_softmax(log p / T): softened once here instead of in every training step."""
        softened = copy.copy(self)
        softened.logprobs = torch.log_softmax(self.logprobs * (self.temperature / temperature), dim=-1)
        softened.temperature = temperature
        return softened

    def __call__(self, batch: dict[str, Tensor]) -> TeacherOutput:
        logprobs = torch.index_select(self.logprobs, 0, batch["index"].cpu())  # (B, C)
        return TeacherOutput(logprobs=logprobs, temperature=self.temperature)


class FeatureTable:
    """A teacher's captured features over every row of a text data set, computed once and kept in memory (float16),
    served padded to each batch like the live teacher would (`TeacherOutput.hidden_states`).

    Token-level features (B, T, D) are stored per row without padding; pooled ones (B, D) as they are. Every student
    trained on the same data reads the table instead of running the teacher again.
    """

    def __init__(self, teacher: Teacher, data: Any, batch_size: int = 128, reporter: Reporter = NULL):
        self.num_classes = teacher.num_classes
        self.rows: dict[str, list[Tensor]] = {}
        lengths = getattr(data, "lengths", None)
        if lengths is None:
            raise CacheError("a feature table needs text data (rows with lengths)")
        order = torch.argsort(lengths, stable=True)  # similar lengths together: little padding
        slots: list[Tensor | None] = [None] * len(data)
        reporter.stage("teacher features", total=len(data))
        per_row: dict[str, list[Tensor | None]] = {}
        for index in order.split(batch_size):
            batch = data.batch(index)
            output = teacher(batch)
            if output.hidden_states is None:
                raise CacheError("the teacher captured no features to keep")
            for name, value in output.hidden_states.items():
                store = per_row.setdefault(name, list(slots))
                for b, row in enumerate(index.tolist()):
                    kept = value[b, : int(lengths[row])] if value.dim() == 3 else value[b]
                    store[row] = kept.to(torch.float16).clone()
            reporter.advance(len(index))
        reporter.end()
        self.rows = {name: [t for t in store if t is not None] for name, store in per_row.items()}

    def __call__(self, batch: dict[str, Any]) -> TeacherOutput:
        rows = batch["index"].tolist()
        width = int(batch["inputs"]["attention_mask"].shape[1])
        features: dict[str, Tensor] = {}
        for name, store in self.rows.items():
            first = store[rows[0]]
            if first.dim() == 1:
                features[name] = torch.stack([store[r] for r in rows]).float()  # (B, D)
                continue
            padded = torch.zeros(len(rows), width, first.shape[-1])  # (B, T, D)
            for b, r in enumerate(rows):
                padded[b, : store[r].shape[0]] = store[r].float()
            features[name] = padded
        return TeacherOutput(logprobs=None, hidden_states=features)
