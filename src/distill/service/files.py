"""Uploaded files: streamed to disk with a size limit and a sha256, validated by format, referenced by id.

Formats, by the file name's extension: `.jsonl` (one JSON object per line), `.csv` / `.tsv` (a header row, then rows
of as many columns), `.txt` (UTF-8 lines, at least one not blank), `.npz` (numeric arrays, no pickles, checked from
their headers: together at most the upload limit once loaded). A file that does not parse is refused with the line
that is wrong; a JSONL line nested more than 64 deep is refused too. The stored name is `<id><ext>` inside the data directory; the
client's file name is only recorded.
"""

from __future__ import annotations

import csv
import json
import os
import secrets
import time
from pathlib import Path
from typing import IO, Any

from sqlalchemy import Engine, select

from distill.asgi import MAX_JSON_DEPTH, json_too_deep
from distill.data import npz_headers, sha256_file
from distill.errors import DataError
from distill.service import db
from distill.service.errors import ServiceError
from distill.service.settings import Settings

FORMATS = {".jsonl": "jsonl", ".csv": "csv", ".tsv": "tsv", ".txt": "txt", ".npz": "npz"}
CHUNK = 1024 * 1024


def _invalid(message: str) -> ServiceError:
    return ServiceError(422, message, param="file", code="invalid_file")


def _count_jsonl(path: Path) -> int:
    rows = 0
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            if json_too_deep(line.encode(), MAX_JSON_DEPTH):
                raise _invalid(f"line {number} nests arrays and objects more than {MAX_JSON_DEPTH} deep")
            try:
                value = json.loads(line)
            except json.JSONDecodeError as error:
                raise _invalid(f"line {number} is not valid JSON ({error.msg})") from None
            if not isinstance(value, dict):
                raise _invalid(f"line {number} is a JSON {type(value).__name__}, not an object")
            rows += 1
    return rows


def _count_table(path: Path, delimiter: str) -> int:
    rows = 0
    with path.open(encoding="utf-8", newline="") as handle:
        if delimiter == "\t":
            reader = csv.reader(handle, delimiter=delimiter, quoting=csv.QUOTE_NONE)
        else:
            reader = csv.reader(handle, delimiter=delimiter)
        try:
            header = next(reader, None)
            if not header or any(not name.strip() for name in header):
                raise _invalid("the first line must be a header naming every column")
            for row in reader:
                if not row or all(not cell.strip() for cell in row):
                    continue
                if len(row) != len(header):
                    raise _invalid(f"line {reader.line_num} has {len(row)} columns but the header has {len(header)}")
                rows += 1
        except csv.Error as error:
            kind = "TSV" if delimiter == "\t" else "CSV"
            raise _invalid(f"line {reader.line_num} is not valid {kind} ({error})") from None
    return rows


def _count_lines(path: Path) -> int:
    with path.open(encoding="utf-8") as handle:
        return sum(1 for line in handle if line.strip())


def _count_npz(path: Path, max_bytes: int) -> int:
    """Rows of the longest array, from the archive's headers: no array is decompressed, so an archive that would
    unpack to more than `max_bytes` (a decompression bomb, or a header declaring a huge shape) is refused at once."""
    try:
        headers = npz_headers(path, max_bytes)
    except DataError as error:
        raise _invalid(str(error).replace(f"{path}: ", "").replace(str(path), "the file")) from None
    return max(header.shape[0] if header.shape else 1 for header in headers.values())


def validate(path: Path, fmt: str, max_array_bytes: int) -> int:
    """Check the file's structure; return its number of rows (lines, records or the longest array's length).
    An .npz's arrays may take at most `max_array_bytes` once loaded."""
    try:
        if fmt == "jsonl":
            rows = _count_jsonl(path)
        elif fmt in ("csv", "tsv"):
            rows = _count_table(path, "," if fmt == "csv" else "\t")
        elif fmt == "txt":
            rows = _count_lines(path)
        else:
            rows = _count_npz(path, max_array_bytes)
    except UnicodeDecodeError as error:
        raise _invalid(f"the file is not UTF-8 text (byte {error.start} of a line)") from None
    if rows == 0:
        raise _invalid("the file has no rows")
    return rows


def store_upload(
    settings: Settings, engine: Engine, source: IO[bytes], filename: str, purpose: str, created_by: str
) -> dict[str, Any]:
    """Copy an upload into the data directory (refusing it past `settings.max_upload_bytes`), validate it and
    record it; return the file's record."""
    suffix = Path(filename).suffix.lower()
    if suffix not in FORMATS:
        raise _invalid(f"file name {filename!r} must end in one of {', '.join(FORMATS)}")
    file_id = f"file-{secrets.token_hex(12)}"
    settings.files_dir.mkdir(parents=True, exist_ok=True)
    partial = settings.files_dir / f".{file_id}.part"
    size = 0
    try:
        with partial.open("wb") as out:
            while chunk := source.read(CHUNK):
                size += len(chunk)
                if size > settings.max_upload_bytes:
                    raise ServiceError(
                        413, f"the file is larger than the limit of {settings.max_upload_bytes} bytes", param="file"
                    )
                out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
        rows = validate(partial, FORMATS[suffix], settings.max_upload_bytes)
        digest = sha256_file(partial)
        os.replace(partial, settings.files_dir / f"{file_id}{suffix}")
    finally:
        partial.unlink(missing_ok=True)
    record = {
        "id": file_id,
        "filename": Path(filename).name[:255],
        "purpose": purpose,
        "format": FORMATS[suffix],
        "bytes": size,
        "sha256": digest,
        "rows": rows,
        "created_by": created_by,
        "created_at": time.time(),
    }
    with db.write(engine) as connection:
        connection.execute(db.files.insert().values(**record))
    return public(record)


def public(record: Any) -> dict[str, Any]:
    data = dict(record._mapping) if hasattr(record, "_mapping") else dict(record)
    data.pop("created_by", None)
    return {"object": "file", **data}


def get_file(engine: Engine, file_id: str) -> dict[str, Any] | None:
    with db.read(engine) as connection:
        row = connection.execute(select(db.files).where(db.files.c.id == file_id)).first()
    return None if row is None else dict(row._mapping)


def list_files(engine: Engine, limit: int = 100) -> list[dict[str, Any]]:
    with db.read(engine) as connection:
        rows = connection.execute(select(db.files).order_by(db.files.c.created_at.desc()).limit(limit)).all()
    return [public(row) for row in rows]


def stored_path(settings: Settings, record: dict[str, Any]) -> Path:
    """Where an uploaded file lies: `<data_dir>/files/<id><ext>`."""
    extension = next(ext for ext, fmt in FORMATS.items() if fmt == record["format"])
    return settings.files_dir / f"{record['id']}{extension}"
