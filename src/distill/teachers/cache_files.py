"""The protocol every on-disk cache of teacher outputs follows (`cached.py`'s soft targets, `token_cache.py`'s top-k):

    manifest.json   written last: its presence marks a finished cache. The cache's identity (what it is of) and
                    every file with its sha256
    <files>         shards (and any index), each written under a temporary name, checksummed, then renamed
    partial.json    only while building: the identity and the shards finished so far

A build killed at any point (even SIGKILL) leaves whole files only; run again, it keeps the shards partial.json lists,
in order, up to the first that is missing or fails its checksum, and scores the rest. Reading checks each file
against the manifest (`check_file`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO, Any

import numpy as np

from distill.data import sha256_file
from distill.errors import CacheError

MANIFEST = "manifest.json"
PARTIAL = "partial.json"


def read_json(path: Path) -> dict[str, Any]:
    """A manifest as a dict; a CacheError (rebuild the cache) when it is unreadable, not UTF-8 JSON, nested too
    deeply to read, or not a mapping."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as error:
        raise CacheError(f"{path} is not readable JSON ({error}); delete the cache directory and rebuild it") from None
    if not isinstance(data, dict):
        raise CacheError(f"{path} is not a cache manifest; delete the cache directory and rebuild it")
    return data


def write_json(path: Path, data: Mapping[str, Any]) -> None:
    """`data` as JSON at `path`, atomically (a temporary file renamed over it)."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


def write_file(path: Path, write: Callable[[IO[bytes]], None]) -> str:
    """What `write` writes to a handle, stored at `path` atomically; returns the file's sha256."""
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("wb") as handle:
        write(handle)
    digest = sha256_file(tmp)
    os.replace(tmp, path)
    return digest


def add_shard(
    directory: Path,
    identity: Mapping[str, Any],
    shards: list[dict[str, Any]],
    name: str,
    array: np.ndarray,
    **fields: int,
) -> None:
    """Store `array` (.npy) as the shard `name`, append its entry ({"file", **fields, "sha256"}) to `shards`, and
    note the build's progress in partial.json."""
    digest = write_file(directory / name, lambda handle: np.save(handle, array))
    shards.append({"file": name, **fields, "sha256": digest})
    write_json(directory / PARTIAL, {**identity, "shards": shards})


def resumable_shards(directory: Path, identity: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The shards a killed build of the same `identity` finished, to keep: those partial.json lists, in order, up
    to the first that is missing or fails its checksum; none without partial.json or when it is another build's."""
    path = directory / PARTIAL
    if not path.exists():
        return []
    partial = read_json(path)
    if any(partial.get(key) != value for key, value in identity.items()):
        return []
    shards: list[dict[str, Any]] = []
    for shard in partial.get("shards", []):
        file = directory / str(shard.get("file"))
        if not (file.exists() and sha256_file(file) == shard.get("sha256")):
            break  # rebuilt from the first missing or damaged shard on
        shards.append(shard)
    return shards


def finish(directory: Path, manifest: Mapping[str, Any]) -> None:
    """Write the manifest (last: it marks the cache finished) and drop partial.json."""
    write_json(directory / MANIFEST, manifest)
    (directory / PARTIAL).unlink(missing_ok=True)


def check_file(path: Path, sha256: str | None, what: str = "cache file") -> None:
    """CacheError when the file is missing or (given its `sha256`) its bytes do not match."""
    if not path.exists():
        raise CacheError(f"{what} {path} is missing; rebuild the cache")
    if sha256 is not None and sha256_file(path) != sha256:
        raise CacheError(f"{what} {path} fails its sha256 check (corrupt); rebuild the cache")
