"""Array data: an in-memory dataset, CSV/TSV/NPZ loading with validation, and the epoch order of batches.

Labels use -100 for "no label" (the PyTorch ignore index): a transfer set is an ArrayDataset whose labels are all
-100, and concatenating it with labeled data gives the mixed set that soft-target distillation trains on.
"""

from __future__ import annotations

import codecs
import csv
import hashlib
import json
import math
import os
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor

from distill.config import MAX_CLASSES
from distill.errors import DataError

IGNORE = -100


class Dataset(Protocol):
    """What the training loop needs: a length and a batch (a dict of tensors, with `index`) for given rows."""

    def __len__(self) -> int: ...

    def batch(self, index: Tensor) -> dict[str, Any]: ...


@dataclass
class ArrayDataset:
    """Inputs (N, *shape) float32 and labels (N,) int64, -100 where a row has no label."""

    inputs: Tensor
    labels: Tensor

    def __post_init__(self) -> None:
        if self.inputs.shape[0] != self.labels.shape[0]:
            raise DataError(f"{self.inputs.shape[0]} inputs but {self.labels.shape[0]} labels")
        self.inputs = self.inputs.float()
        self.labels = self.labels.long()

    def __len__(self) -> int:
        return int(self.inputs.shape[0])

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.inputs.shape[1:])

    @property
    def labeled(self) -> int:
        return int((self.labels != IGNORE).sum())

    def batch(self, index: Tensor) -> dict[str, Tensor]:
        index = torch.as_tensor(index, dtype=torch.long)
        # index_select: a third of the time of advanced indexing for a batch of a few hundred rows
        return {"inputs": self.inputs.index_select(0, index), "labels": self.labels.index_select(0, index),
                "index": index}  # fmt: skip

    def unlabeled(self) -> ArrayDataset:
        """The same inputs with every label removed (a transfer set)."""
        return ArrayDataset(self.inputs, torch.full_like(self.labels, IGNORE))

    def subset(self, index: Tensor | slice) -> ArrayDataset:
        return ArrayDataset(self.inputs[index], self.labels[index])

    def fingerprint(self) -> str:
        """sha256 of the inputs and labels: a cache built for other data will not be used for this data."""
        digest = hashlib.sha256()
        digest.update(str(tuple(self.inputs.shape)).encode())
        digest.update(self.inputs.contiguous().numpy().tobytes())
        digest.update(self.labels.contiguous().numpy().tobytes())
        return digest.hexdigest()


def concat(*parts: ArrayDataset) -> ArrayDataset:
    """Rows of every part, in order (for example labeled data followed by a transfer set)."""
    shapes = {p.input_shape for p in parts}
    if len(shapes) != 1:
        raise DataError(f"cannot combine data of different input shapes {sorted(shapes)}")
    return ArrayDataset(torch.cat([p.inputs for p in parts]), torch.cat([p.labels for p in parts]))


def check_labels(labels: Tensor, num_classes: int, source: str) -> None:
    """Every label is -100 (none) or in 0..num_classes-1; otherwise a DataError naming the first bad row."""
    bad = ((labels < 0) & (labels != IGNORE)) | (labels >= num_classes)
    if bool(bad.any()):
        row = int(bad.nonzero()[0, 0])
        raise DataError(
            f"label {int(labels[row])} at row {row} of {source} is outside 0..{num_classes - 1} "
            f"(num_classes={num_classes})"
        )


def infer_num_classes(labels: Tensor, source: str) -> int:
    """The number of classes labels 0..C-1 imply (the largest label + 1); a DataError, before anything is sized by
    it, when no row is labeled or the largest label would make more than MAX_CLASSES classes."""
    labeled = labels != IGNORE
    if not bool(labeled.any()):
        raise DataError(f"{source} has no labeled rows (every label is {IGNORE})")
    top = int(labels[labeled].max())
    if top >= MAX_CLASSES:
        row = int((labels == top).nonzero()[0, 0])
        raise DataError(
            f"label {top} at row {row} of {source} would make {top + 1:,} classes, over the limit of {MAX_CLASSES:,}; "
            "labels are class indices 0..C-1"
        )
    return max(top + 1, 2)


def epoch_order(n: int, batch_size: int, seed: int, epoch: int, lengths: Tensor | None = None) -> list[Tensor]:
    """The batches of one epoch: a permutation fixed by (seed, epoch), so a resumed run sees the same order.

    With `lengths` (texts), rows are sorted by length within windows of 50 batches and the batches are shuffled:
    each batch then pads little, and the order stays random across batches.
    """
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(n, generator=generator)
    if lengths is None:
        return list(order.split(batch_size))
    batches: list[Tensor] = []
    for window in order.split(batch_size * 50):
        ranked = window[torch.argsort(lengths[window], stable=True)]
        batches += list(ranked.split(batch_size))
    shuffle = torch.randperm(len(batches), generator=generator)
    return [batches[i] for i in shuffle.tolist()]


# ----------------------------------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------------------------------


def load_arrays(
    path: Path,
    *,
    label_column: str = "label",
    features_key: str = "x",
    labels_key: str = "y",
    require_labels: bool = True,
    max_bytes: int | None = None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Features (N, ...) float32 and integer labels (N,) or None, from a CSV, TSV or NPZ file.

    CSV/TSV: UTF-8 text, a header row; the label column by name; every other column a numeric feature.
    NPZ: arrays named `features_key` and `labels_key`, refused from their headers alone (before any is loaded) when
    they would take more than `max_bytes` (default: this machine's physical memory).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file {path} does not exist")
    suffix = path.suffix.lower()
    if suffix == ".npz":
        limit = physical_memory() if max_bytes is None else max_bytes
        features, labels = _load_npz(path, features_key, labels_key, require_labels, limit)
    elif suffix in (".csv", ".tsv", ".txt"):
        features, labels = _load_table(path, label_column, "\t" if suffix == ".tsv" else ",", require_labels)
    else:
        raise DataError(f"data file {path} must be .csv, .tsv or .npz, not {suffix or 'without extension'}")
    if features.shape[0] == 0:
        raise DataError(f"data file {path} has no rows")
    if not np.isfinite(features).all():
        row = int(np.argwhere(~np.isfinite(features.reshape(len(features), -1)))[0, 0])
        raise DataError(f"data file {path} has a NaN or infinite feature at row {row}")
    return features, labels


@dataclass(frozen=True)
class ArrayHeader:
    """What an array in an .npz archive declares about itself, read before any of its data is."""

    shape: tuple[int, ...]
    dtype: np.dtype[Any]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize  # Python ints: a crafted shape cannot overflow


def npz_headers(path: Path, max_bytes: int) -> dict[str, ArrayHeader]:
    """Every array of an .npz archive, by name, from the archive's headers alone: nothing is decompressed beyond
    each array's header. A DataError when the archive is unreadable, holds something other than numeric arrays
    (pickled objects included), or its arrays would take more than `max_bytes` once loaded."""
    headers: dict[str, ArrayHeader] = {}
    try:
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                name = info.filename.removesuffix(".npy")
                with archive.open(info) as handle:
                    version = np.lib.format.read_magic(handle)
                    read = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
                    if version not in read:
                        raise DataError(f"{path}: array {name!r} has .npy format {version}; only 1.0 and 2.0 are read")
                    shape, _, dtype = read[version](handle)
                if dtype.hasobject or dtype.kind not in "fiub":
                    raise DataError(f"{path}: array {name!r} has dtype {dtype}; only numeric arrays are accepted")
                headers[name] = ArrayHeader(tuple(int(n) for n in shape), dtype)
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as error:
        raise DataError(f"{path} is not a readable .npz archive of numeric arrays ({error})") from None
    if not headers:
        raise DataError(f"{path}: the archive holds no arrays")
    total = sum(header.nbytes for header in headers.values())
    if total > max_bytes:
        raise DataError(
            f"{path}: its arrays would take {total:,} bytes once loaded, over the limit of {max_bytes:,} bytes"
        )
    return headers


def physical_memory() -> int:
    """Bytes of physical memory of this machine (the most an array loaded here could take)."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _load_npz(
    path: Path, features_key: str, labels_key: str, require_labels: bool, max_bytes: int
) -> tuple[np.ndarray, np.ndarray | None]:
    names = sorted(npz_headers(path, max_bytes))  # shapes and dtypes checked before any array is read
    if features_key not in names:
        raise DataError(f"{path} has no array {features_key!r} (arrays: {', '.join(names) or 'none'})")
    try:
        with np.load(path, allow_pickle=False) as archive:
            features = archive[features_key]
            labels = archive[labels_key] if labels_key in names else None
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as error:
        raise DataError(f"{path} is not a readable .npz file ({error})") from None
    if labels is None and require_labels:
        raise DataError(f"{path} has no labels array {labels_key!r} (arrays: {', '.join(names)})")
    if features.dtype.kind not in "fiub" or features.ndim < 2:
        raise DataError(
            f"{path}: {features_key!r} must be a numeric array of shape (rows, features...), "
            f"got {features.dtype} {features.shape}"
        )
    if labels is not None:
        labels = _integer_labels(
            np.asarray(labels).reshape(-1) if labels.ndim == 2 and labels.shape[1] == 1 else labels, path
        )
        if labels.shape[0] != features.shape[0]:
            raise DataError(f"{path}: {features.shape[0]} rows of {features_key!r} but {labels.shape[0]} labels")
    return features.astype(np.float32), labels


def _load_table(
    path: Path, label_column: str, delimiter: str, require_labels: bool
) -> tuple[np.ndarray, np.ndarray | None]:
    try:
        header, label_at, rows, raw_labels = _read_rows(path, label_column, delimiter, require_labels)
    except UnicodeDecodeError:
        raise not_utf8(path) from None
    if not rows:
        raise DataError(f"data file {path} has a header but no rows")
    if rows and not rows[0]:
        raise DataError(f"data file {path} has no feature columns besides {label_column!r}")
    features = np.asarray(rows, dtype=np.float32)
    labels = None
    if label_at is not None:
        try:
            labels = _integer_labels(np.asarray([float(v) for v in raw_labels]), path)
        except ValueError:
            bad = next(v for v in raw_labels if not _is_number(v))
            raise DataError(f"{path}: label {bad!r} is not an integer class index") from None
    return features, labels


def _read_rows(
    path: Path, label_column: str, delimiter: str, require_labels: bool
) -> tuple[list[str], int | None, list[list[float]], list[str]]:
    """(header, index of the label column or None, feature rows, raw labels) of a UTF-8 CSV/TSV file."""
    with path.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.reader(handle, delimiter=delimiter)
        header = next(reader, None)
        if not header:
            raise DataError(f"data file {path} is empty (expected a header row)")
        header = [h.strip() for h in header]
        if label_column in header:
            label_at: int | None = header.index(label_column)
        elif require_labels:
            raise DataError(f"data file {path} has no column {label_column!r} (columns: {', '.join(header)})")
        else:
            label_at = None
        rows: list[list[float]] = []
        raw_labels: list[str] = []
        for number, row in enumerate(reader, start=2):
            if not row or all(not cell.strip() for cell in row):
                continue
            if len(row) != len(header):
                raise DataError(f"line {number} of {path} has {len(row)} values but the header has {len(header)}")
            values = []
            for column, cell in enumerate(row):
                if column == label_at:
                    raw_labels.append(cell.strip())
                    continue
                try:
                    values.append(float(cell))
                except ValueError:
                    raise DataError(
                        f"line {number} of {path}, column {header[column]!r}: {cell!r} is not a number"
                    ) from None
            rows.append(values)
    return header, label_at, rows, raw_labels


def _is_number(value: str) -> bool:
    try:
        float(value)
    except ValueError:
        return False
    return True


def _integer_labels(labels: np.ndarray, path: Path) -> np.ndarray:
    if labels.ndim != 1:
        raise DataError(f"{path}: labels must be one integer per row, got shape {labels.shape}")
    if labels.dtype.kind == "f":
        if not np.isfinite(labels).all() or not np.all(labels == np.round(labels)):
            row = int(np.argwhere(~np.isfinite(labels) | (labels != np.round(labels)))[0, 0])
            raise DataError(f"{path}: label {labels[row]} at row {row} is not an integer class index")
    elif labels.dtype.kind not in "iu":
        raise DataError(f"{path}: labels must be integers, got {labels.dtype}")
    return labels.astype(np.int64)


def dataset_from_file(
    path: Path,
    *,
    num_classes: int | None = None,
    input_shape: tuple[int, ...] | None = None,
    label_column: str = "label",
    features_key: str = "x",
    labels_key: str = "y",
    require_labels: bool = True,
) -> ArrayDataset:
    """Load a file into an ArrayDataset, reshaping features to `input_shape` and checking the label range."""
    features, labels = load_arrays(
        path, label_column=label_column, features_key=features_key, labels_key=labels_key, require_labels=require_labels
    )
    if input_shape is not None:
        per_row = int(np.prod(features.shape[1:]))
        if int(np.prod(input_shape)) != per_row:
            raise DataError(f"{path}: {per_row} features per row cannot be reshaped to input_shape {list(input_shape)}")
        features = features.reshape((features.shape[0], *input_shape))
    label_tensor = (
        torch.from_numpy(labels) if labels is not None else torch.full((features.shape[0],), IGNORE, dtype=torch.long)
    )
    dataset = ArrayDataset(torch.from_numpy(features), label_tensor)
    if num_classes is not None:
        check_labels(dataset.labels, num_classes, str(path))
    return dataset


# ----------------------------------------------------------------------------------------------------------------
# Text
# ----------------------------------------------------------------------------------------------------------------


class TextDataset:
    """Tokenized texts (ragged token ids) with labels; a batch is padded to its longest row.

    A batch is `{"inputs": {"input_ids": (B, T), "attention_mask": (B, T)[, "token_type_ids"]}, "labels": (B,),
    "index": (B,)}`, ready for a Hugging Face model's keyword arguments or the built-in text students.
    """

    def __init__(
        self, ids: Sequence[Sequence[int]], labels: Tensor | None = None, *, pad_id: int = 0, token_types: bool = False
    ):
        lengths = torch.tensor([len(row) for row in ids], dtype=torch.long)
        if bool((lengths == 0).any()):
            raise DataError(f"text row {int((lengths == 0).nonzero()[0, 0])} has no tokens")
        self.flat = torch.tensor([token for row in ids for token in row], dtype=torch.long)  # (total,)
        self.offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])  # (N + 1,)
        self.lengths = lengths  # (N,)
        self.labels = (labels if labels is not None else torch.full((len(ids),), IGNORE)).long()
        if len(self.labels) != len(ids):
            raise DataError(f"{len(ids)} texts but {len(self.labels)} labels")
        self.pad_id = pad_id
        self.token_types = token_types

    def __len__(self) -> int:
        return len(self.lengths)

    def row(self, i: int) -> list[int]:
        return self.flat[int(self.offsets[i]) : int(self.offsets[i + 1])].tolist()

    def batch(self, index: Tensor) -> dict[str, Any]:
        rows = index.tolist()
        width = int(self.lengths[index].max()) if rows else 0
        input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)  # (B, T)
        mask = torch.zeros((len(rows), width), dtype=torch.long)  # (B, T)
        for b, i in enumerate(rows):
            start, stop = int(self.offsets[i]), int(self.offsets[i + 1])
            input_ids[b, : stop - start] = self.flat[start:stop]
            mask[b, : stop - start] = 1
        inputs = {"input_ids": input_ids, "attention_mask": mask}
        if self.token_types:
            inputs["token_type_ids"] = torch.zeros_like(input_ids)
        return {"inputs": inputs, "labels": self.labels[index], "index": index}

    def subset(self, index: Tensor) -> TextDataset:
        return TextDataset(
            [self.row(i) for i in index.tolist()], self.labels[index], pad_id=self.pad_id, token_types=self.token_types
        )

    def unlabeled(self) -> TextDataset:
        copy = TextDataset.__new__(TextDataset)
        copy.__dict__.update(self.__dict__)
        copy.labels = torch.full_like(self.labels, IGNORE)
        return copy

    def fingerprint(self) -> str:
        digest = hashlib.sha256()
        for tensor in (self.flat, self.offsets, self.labels):
            digest.update(tensor.contiguous().numpy().tobytes())
        return digest.hexdigest()


def concat_text(*parts: TextDataset) -> TextDataset:
    """Rows of every part, in order (labeled data followed by a transfer set)."""
    joined = TextDataset.__new__(TextDataset)
    joined.flat = torch.cat([p.flat for p in parts])
    joined.lengths = torch.cat([p.lengths for p in parts])
    joined.offsets = torch.cat([torch.zeros(1, dtype=torch.long), joined.lengths.cumsum(0)])
    joined.labels = torch.cat([p.labels for p in parts])
    joined.pad_id, joined.token_types = parts[0].pad_id, parts[0].token_types
    return joined


def tokenize(tokenizer: Any, texts: Sequence[str], max_length: int = 128) -> list[list[int]]:
    """Token ids of each text with a Hugging Face tokenizer (special tokens added, truncated to `max_length`)."""
    return list(tokenizer(list(texts), truncation=True, max_length=max_length)["input_ids"])


def read_table(
    path: Path, columns: Sequence[str], *, header: bool = True, names: Sequence[str] | None = None
) -> dict[str, list[str]]:
    """The named columns of a TSV/CSV file as lists of strings.

    With `header`, columns are found by the header row's names; without, `names` gives every column's name.
    A missing column or a short row is a DataError naming the file, the line and what exists.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file {path} does not exist")
    delimiter = "\t" if path.suffix.lower() in (".tsv", ".txt") else ","
    try:
        table = _read_columns(path, columns, delimiter, header, names)
    except UnicodeDecodeError:
        raise not_utf8(path) from None
    if not table[columns[0]]:
        raise DataError(f"data file {path} has no rows")
    return table


def _read_columns(
    path: Path, columns: Sequence[str], delimiter: str, header: bool, names: Sequence[str] | None
) -> dict[str, list[str]]:
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.reader(
            handle, delimiter=delimiter, quoting=csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
        )
        if header:
            first = next(reader, None)
            if not first:
                raise DataError(f"data file {path} is empty (expected a header row)")
            heading = [h.strip() for h in first]
        else:
            heading = list(names or [])
        missing = [c for c in columns if c not in heading]
        if missing:
            raise DataError(f"data file {path} has no column {missing[0]!r} (columns: {', '.join(heading) or 'none'})")
        where = [heading.index(c) for c in columns]
        table: dict[str, list[str]] = {c: [] for c in columns}
        for number, row in enumerate(reader, start=2 if header else 1):
            if not row:
                continue
            if len(row) <= max(where):
                raise DataError(f"line {number} of {path} has {len(row)} columns; expected at least {max(where) + 1}")
            for column, at in zip(columns, where):
                table[column].append(row[at])
    return table


def read_lines(path: Path) -> list[str]:
    """Non-empty lines of a text file (one sentence each)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"text file {path} does not exist")
    lines = [line.strip() for line in read_text(path).splitlines()]
    lines = [line for line in lines if line]
    if not lines:
        raise DataError(f"text file {path} has no sentences")
    return lines


def json_lines(path: Path) -> Iterator[tuple[str, Any]]:
    """(where, value) for each non-empty line of a UTF-8 JSONL file, `where` naming the line ("line 3 of f.jsonl");
    a DataError naming the line when one is not valid JSON or nests too deeply, or the first byte that is not
    UTF-8."""
    try:
        with Path(path).open(encoding="utf-8") as handle:
            for number, line in enumerate(handle, start=1):
                if line.strip():
                    where = f"line {number} of {path}"
                    yield where, parse_json(line, where)
    except UnicodeDecodeError:
        raise not_utf8(Path(path)) from None


def parse_json(text: str, where: str) -> Any:
    """The JSON value of `text`; a DataError naming `where` when it is not JSON or nests too deeply to read."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise DataError(f"{where} is not valid JSON ({error.msg})") from None
    except RecursionError:
        raise DataError(f"{where} holds JSON nested too deeply to read") from None


def read_text(path: Path) -> str:
    """The whole of a UTF-8 text file; a DataError naming the first byte that is not UTF-8."""
    try:
        return Path(path).read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        raise not_utf8(Path(path)) from None


def read_json(path: Path, keys: Sequence[str] = ()) -> Any:
    """The JSON value in a UTF-8 file (metrics.json, history.json...); a one-line DataError when the file is not
    UTF-8, not JSON, nests too deeply to read, or (given `keys`) is not an object holding every one of them."""
    value = parse_json(read_text(path), str(path))
    if keys and (not isinstance(value, dict) or any(key not in value for key in keys)):
        raise DataError(
            f"{path} is not what distill wrote there (an object with {', '.join(keys)}); delete it to redo that step"
        )
    return value


def not_utf8(path: Path) -> DataError:
    """The DataError for a file that is not UTF-8 text, naming the offset and line of its first bad byte (found by
    decoding the file again in blocks, so it costs nothing until a file fails)."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset, line = 0, 1
    with path.open("rb") as handle:
        while True:
            block = handle.read(1 << 20)
            pending = len(decoder.getstate()[0])  # bytes of an unfinished character carried from the last block
            try:
                decoder.decode(block, final=not block)
            except UnicodeDecodeError as error:
                at = offset - pending + error.start
                line += block[: max(at - offset, 0)].count(b"\n")
                return DataError(
                    f"{path} is not UTF-8 text (byte {at:,}, line {line}: {error.reason}); save it as UTF-8"
                )
            if not block:
                return DataError(f"{path} is not UTF-8 text; save it as UTF-8")
            offset += len(block)
            line += block.count(b"\n")


# ----------------------------------------------------------------------------------------------------------------
# Generated data kept between runs
# ----------------------------------------------------------------------------------------------------------------


def save_checked_array(path: Path, array: np.ndarray) -> None:
    """Write `array` to `path` (.npy) with its sha256 beside it (`path.sha256`), each atomically: processes writing
    the same file at once do not collide, and a kill mid-write leaves no half file under either name."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp.npy")
    np.save(tmp, array)
    digest = sha256_file(tmp)
    tmp.replace(path)
    checksum = Path(f"{path}.sha256")
    tmp_checksum = Path(f"{checksum}.{os.getpid()}.tmp")
    tmp_checksum.write_text(digest + "\n")
    tmp_checksum.replace(checksum)


def load_checked_array(path: Path) -> np.ndarray | None:
    """The array saved by `save_checked_array`, or None when it is missing, its checksum is missing or does not
    match (a damaged file), or it is not a plain numeric .npy: the caller regenerates it."""
    checksum = Path(f"{path}.sha256")
    if not path.is_file() or not checksum.is_file():
        return None
    if sha256_file(path) != checksum.read_text(errors="replace").strip():
        return None
    try:
        return np.load(path, allow_pickle=False)
    except (ValueError, OSError):
        return None


def sha256_file(path: Path) -> str:
    """The sha256 of a file's bytes, read in blocks: the one checksum of files (kept arrays, teacher caches, job
    artifacts, uploads)."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
