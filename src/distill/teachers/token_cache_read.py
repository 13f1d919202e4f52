"""Reading a token cache: `TokenCache` serves a batch of sequences' top-K log-probs and ids, memory-mapped;
`verify_token_cache` checks every byte. A cache is built by `distill.teachers.token_cache`.

Layout of a cache directory:

    manifest.json       format and version, teacher name and revision, tokenizer hash, vocabulary size, K,
                        temperature, quantisation (`token_codec.Codec.params`), storage, data id and content hash,
                        counts, and every file with its sha256; written last: a directory without it is an
                        unfinished build
    shard-00000.npy     the records (`token_codec`) of scored positions, in data order, stored as the format version
    ...                 says (`token_shards`: version 2 entropy-codes the ids; version 1 caches are still read)
    index.npz           lengths (N,) uint32 tokens per sequence, scored (N,) uint32 scored positions per sequence,
                        mask (ceil(sum(lengths) / 8),) uint8 which positions are scored, bit-packed, sequence after
                        sequence; sequence i's records are the rows from sum(scored[:i]) on, counted across shards
    partial.json        only while building: the shards finished so far; a killed build resumes from them

The files are written, resumed and checked as `distill.teachers.cache_files` describes.

Position t of a sequence holds the teacher's distribution of token t + 1 (`logits[t]`), at the cache's temperature:
log_softmax(logits / T). The record format and its error bound are in `distill.teachers.token_codec`.

**Filler.** `TokenCache.batch` returns (B, T, K) arrays aligned with a right-padded batch. A position that was not
scored (not in the mask, or padding) holds log-prob 0 at id 0 in slot 0 and LOG_FLOOR (-100) at ids 1 .. K-1: a
valid one-hot distribution with an empty tail, so every loss stays finite there; the caller's loss mask removes it.
"""

from __future__ import annotations

import math
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from distill.errors import CacheError
from distill.losses import LOG_FLOOR
from distill.teachers.cache_files import MANIFEST, PARTIAL, check_file, read_json
from distill.teachers.protocol import TeacherOutput
from distill.teachers.token_codec import Codec
from distill.teachers.token_shards import Shard, open_shard

FORMAT = "distill-token-cache"
VERSION = 2  # what a build writes
READABLE = (1, 2)  # the versions a cache may have
INDEX = "index.npz"
VERIFY_ROWS = 8192  # positions decoded at a time by verify_token_cache
EXPECTABLE = ("teacher_name", "teacher_revision", "tokenizer_hash", "vocab_size", "top_k", "temperature", "data_id")


def differences(found: Mapping[str, Any], wanted: Mapping[str, Any]) -> list[str]:
    """'key found, not wanted' for every key where they differ."""
    out = []
    for key, value in wanted.items():
        have = found.get(key)
        same = isinstance(value, float) and isinstance(have, (int, float)) and math.isclose(have, value, rel_tol=1e-9)
        if not same and have != value:
            out.append(f"{key} {have!r}, not {value!r}")
    return out


def read_manifest(directory: Path) -> dict[str, Any]:
    """The manifest, checked for format, version and fields; CacheError for a missing, unfinished or bad one."""
    path = directory / MANIFEST
    if not path.exists():
        if (directory / PARTIAL).exists():
            raise CacheError(f"{directory} holds an unfinished token cache build; run the build again to resume it")
        raise CacheError(f"{directory} has no {MANIFEST}: not a token cache; build one with build_token_cache")
    manifest = read_json(path)
    if manifest.get("format") != FORMAT:
        raise CacheError(f"{path} is not a {FORMAT} manifest; rebuild the cache")
    version = manifest.get("version")
    if not (isinstance(version, int) and version in READABLE):
        raise CacheError(
            f"{path} is a token cache of format version {version!r}, which this version of distill does not read "
            f"(it reads versions {', '.join(map(str, READABLE))}); rebuild the cache, or read it with the distill "
            "that wrote it"
        )
    try:
        for key in ("sequences", "tokens", "positions", "vocab_size", "top_k"):
            int(manifest[key])
        float(manifest["temperature"])
        for entry in [manifest["index"], *manifest["shards"]]:
            str(entry["file"]), str(entry["sha256"])
            if entry is not manifest["index"] and version >= 2 and int(entry["id_bits"]) < 0:
                raise ValueError(f"id_bits {entry['id_bits']} of {entry['file']}")
        shards = manifest["shards"]
        starts = [(int(s["first_sequence"]), int(s["first_row"])) for s in shards]
        ends = [(0, 0)] + [(a + int(s["sequences"]), b + int(s["rows"])) for (a, b), s in zip(starts, shards)]
    except (KeyError, TypeError, ValueError) as error:
        raise CacheError(f"{path} is malformed ({type(error).__name__}: {error}); rebuild the cache") from None
    if starts != ends[:-1] or ends[-1] != (manifest["sequences"], manifest["positions"]):
        raise CacheError(f"{path} lists shards that do not cover its sequences and positions; rebuild the cache")
    return manifest


def _read_index(path: Path, manifest: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """lengths (N,) int64, scored (N,) int64 and the bit-packed mask of scored positions; CacheError when the
    index is unreadable or does not match the manifest's counts."""
    try:
        with np.load(path) as index:
            lengths = index["lengths"].astype(np.int64)  # (N,)
            counts = index["scored"].astype(np.int64)  # (N,)
            mask = index["mask"]  # (ceil(tokens / 8),) uint8
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as error:
        raise CacheError(f"cache index {path} is unreadable ({error}); rebuild the cache") from None
    n, tokens = manifest["sequences"], manifest["tokens"]
    if (
        lengths.shape != (n,)
        or counts.shape != (n,)
        or lengths.sum() != tokens
        or counts.sum() != manifest["positions"]
        or mask.shape != ((tokens + 7) // 8,)
    ):
        raise CacheError(f"cache index {path} does not match the manifest's counts; rebuild the cache")
    return lengths, counts, mask


class TokenCache:
    """A finished token cache, memory-mapped, serving `TeacherOutput`s for batches of sequence indices.

    `expect` names what the caller requires (any of teacher_name, teacher_revision, tokenizer_hash, vocab_size,
    top_k, temperature, data_id); a cache that differs is refused with a CacheError saying what differs.
    """

    def __init__(self, directory: Path | str, *, expect: Mapping[str, Any] | None = None):
        self.directory = Path(directory)
        manifest = read_manifest(self.directory)
        unknown = set(expect or {}) - set(EXPECTABLE)
        if unknown:
            raise ValueError(f"cannot expect {sorted(unknown)} of a token cache; choose from {list(EXPECTABLE)}")
        differ = differences(manifest, expect or {})
        if differ:
            raise CacheError(
                f"token cache {self.directory} was built with {'; '.join(differ)}; rebuild it or open another"
            )
        self.manifest = manifest
        self.codec = Codec.from_params(manifest["quantisation"])
        self.num_classes = self.codec.vocab_size
        self.top_k = self.codec.top_k
        self.temperature = float(manifest["temperature"])
        self.version = int(manifest["version"])
        self.lengths, counts, self.mask = _read_index(self.directory / INDEX, manifest)
        self.token_start = np.concatenate([[0], np.cumsum(self.lengths)])  # (N+1,)
        self.row_start = np.concatenate([[0], np.cumsum(counts)])  # (N+1,)
        self.shards: list[Shard] = []  # memory-mapped
        self.shard_rows = np.array([int(s["first_row"]) for s in manifest["shards"]], np.int64)  # (shards,)
        for shard in manifest["shards"]:
            path = self.directory / shard["file"]
            check_file(path, None, "cache shard")
            self.shards.append(open_shard(path, shard, self.codec, self.version))

    def __len__(self) -> int:
        return len(self.lengths)

    def records(self, rows: np.ndarray) -> np.ndarray:
        """The records (n,) (`Codec.record_dtype`) of global rows (n,), gathered from the shards that hold them (one
        loop step per shard); `codec.decode` gives their log-probs, `["ids"]` their ids."""
        rows = np.asarray(rows, np.int64)
        if rows.size and (rows.min() < 0 or rows.max() >= self.row_start[-1]):
            raise IndexError(f"row {rows.max()} is outside the cache's {self.row_start[-1]} positions")
        shard = np.searchsorted(self.shard_rows, rows, side="right") - 1  # (n,)
        if len(self.shards) == 1 or (rows.size and shard.min() == shard.max()):
            s = int(shard[0]) if rows.size else 0
            return self.shards[s].records(rows - self.shard_rows[s])
        out = np.empty(rows.size, self.codec.record_dtype)
        for s in np.unique(shard):
            chosen = shard == s
            out[chosen] = self.shards[s].records(rows[chosen] - self.shard_rows[s])
        return out

    def batch(self, indices: Sequence[int] | np.ndarray | Tensor, length: int) -> TeacherOutput:
        """Top-K log-probs (B, length, K) float32 and ids (B, length, K) int64 for sequences `indices`, right-padded
        to `length`; unscored positions hold the filler of the module docstring and are False in `mask` (B, length)."""
        seq = np.asarray(indices, dtype=np.int64).reshape(-1)  # (B,)
        if seq.size and (seq.min() < 0 or seq.max() >= len(self)):
            raise IndexError(f"sequence index {seq.max()} is outside the cache's {len(self)} sequences")
        lengths = self.lengths[seq]  # (B,)
        if seq.size and lengths.max() > length:
            raise ValueError(f"a sequence of the batch has {lengths.max()} tokens, more than the padded {length}")
        k = self.top_k
        inside = np.arange(length) < lengths[:, None]  # (B, T)
        bit = np.where(inside, self.token_start[seq][:, None] + np.arange(length), 0)  # (B, T)
        scored = inside & ((self.mask[bit >> 3] >> (7 - (bit & 7))) & 1).astype(bool)  # (B, T)
        rows = (self.row_start[seq][:, None] + np.cumsum(scored, axis=1) - 1)[scored]  # (n,)
        records = self.records(rows)  # (n,)
        out_logprobs = np.empty((seq.size, length, k), np.float32)  # (B, T, K)
        out_ids = np.empty((seq.size, length, k), np.int64)  # (B, T, K)
        out_logprobs[scored] = self.codec.decode(records)  # (n, K)
        out_ids[scored] = records["ids"]  # (n, K), widened on assignment
        filler = ~scored  # (B, T)
        out_logprobs[filler] = np.where(np.arange(k) == 0, 0.0, LOG_FLOOR).astype(np.float32)
        out_ids[filler] = np.arange(k)
        return TeacherOutput(
            torch.from_numpy(out_logprobs),
            torch.from_numpy(out_ids),
            temperature=self.temperature,
            mask=torch.from_numpy(scored),
        )

    def __call__(self, batch: dict[str, Any]) -> TeacherOutput:
        """The `Teacher` protocol: sequences `batch["index"]` (B,), padded like the batch's `input_ids` (B, T)."""
        inputs = batch.get("inputs", batch)
        return self.batch(batch["index"].cpu(), int(inputs["input_ids"].shape[-1]))


def verify_token_cache(directory: Path | str) -> dict[str, Any]:
    """Check every file's sha256 and the index against the manifest, and decode every position (its ids and its
    log-probs); return a summary. CacheError when not sound."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    for entry in [manifest["index"], *manifest["shards"]]:
        check_file(directory / entry["file"], entry["sha256"])
    cache = TokenCache(directory)
    for shard in manifest["shards"]:  # one shard's sequences at a time: memory stays in proportion to a shard
        first, stop = shard["first_sequence"], shard["first_sequence"] + shard["sequences"]
        begin, end = cache.token_start[first], cache.token_start[stop]
        bits = np.unpackbits(cache.mask[begin // 8 : (end + 7) // 8])[begin % 8 : begin % 8 + end - begin]
        running = np.concatenate([[0], np.cumsum(bits, dtype=np.int64)])  # (tokens_in_shard + 1,)
        starts = cache.token_start[first : stop + 1] - begin  # (sequences + 1,)
        if not np.array_equal(np.diff(running[starts]), np.diff(cache.row_start[first : stop + 1])):
            raise CacheError(f"cache index {directory / INDEX} disagrees with itself (mask vs counts); rebuild it")
    for first_row in range(0, int(cache.row_start[-1]), VERIFY_ROWS):  # raises on a position that does not decode
        cache.codec.decode(cache.records(np.arange(first_row, min(first_row + VERIFY_ROWS, int(cache.row_start[-1])))))
    files = [MANIFEST, manifest["index"]["file"], *(s["file"] for s in manifest["shards"])]
    size = sum((directory / name).stat().st_size for name in files)
    positions = int(manifest["positions"])
    return {
        "sequences": int(manifest["sequences"]),
        "positions": positions,
        "tokens": int(manifest["tokens"]),
        "shards": len(manifest["shards"]),
        "format_version": cache.version,
        "top_k": cache.top_k,
        "vocab_size": cache.num_classes,
        "id_dtype": cache.codec.id_dtype.name,
        "bytes": size,
        "bytes_per_position": size / max(positions, 1),
        "kl_bound": cache.codec.kl_bound(),
    }
