"""A teacher LM's top-K next-token log-probs, scored once over the training data and read memory-mapped by every
epoch and every student (score once, train many).

Layout of a cache directory:

    manifest.json       format, teacher name and revision, tokenizer hash, vocabulary size, K, temperature,
                        quantisation (`token_codec.Codec.params`), data id and content hash, counts, and every file
                        with its sha256; written last: a directory without it is an unfinished build
    shard-00000.npy     (rows,) fixed-size records (`token_codec`), one per scored position, in data order
    ...
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

import hashlib
import math
import zipfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distill.errors import CacheError
from distill.losses import LOG_FLOOR
from distill.progress import NULL, Cancelled, Reporter
from distill.teachers.cache_files import (
    MANIFEST,
    PARTIAL,
    add_shard,
    check_file,
    finish,
    read_json,
    resumable_shards,
    write_file,
)
from distill.teachers.local import logits_of
from distill.teachers.protocol import TeacherOutput
from distill.teachers.token_codec import Codec

FORMAT = "distill-token-cache"
VERSION = 1
INDEX = "index.npz"
EXPECTABLE = ("teacher_name", "teacher_revision", "tokenizer_hash", "vocab_size", "top_k", "temperature", "data_id")

LogitsFn = Callable[[Tensor, Tensor], Tensor]  # input_ids (B, T), attention_mask (B, T) -> logits (B, T, V)


def causal_lm_logits(model: nn.Module) -> LogitsFn:
    """A Hugging Face causal LM (or any module taking input_ids/attention_mask) as the `teacher` of the build."""
    model.eval()
    device = next(model.parameters()).device

    def logits(input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        return logits_of(model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device)))

    return logits


def _as_inputs(
    sequences: Sequence[np.ndarray | Tensor], scored: Sequence[np.ndarray | Tensor] | None, vocab_size: int
) -> tuple[list[np.ndarray], list[np.ndarray], str]:
    """Token arrays, scored masks (default: every position but the last) and a sha256 of both."""
    ids, masks, digest = [], [], hashlib.sha256()
    if scored is not None and len(scored) != len(sequences):
        raise ValueError(f"{len(sequences)} sequences but {len(scored)} scored masks")
    for i, sequence in enumerate(sequences):
        array = np.asarray(sequence)
        if array.ndim != 1 or not (np.issubdtype(array.dtype, np.integer) or array.size == 0):
            raise ValueError(f"sequence {i} must be a 1-D array of token ids, got {array.dtype} {array.shape}")
        if array.size and (array.min() < 0 or array.max() >= vocab_size):
            bad = array.min() if array.min() < 0 else array.max()
            raise ValueError(f"sequence {i} holds token id {bad}, outside the vocabulary of {vocab_size}")
        mask = np.arange(array.size) < array.size - 1 if scored is None else np.asarray(scored[i])
        if mask.shape != array.shape or mask.dtype != np.bool_:
            raise ValueError(f"scored mask {i} must be a boolean array of shape {array.shape}, got {mask.dtype}")
        ids.append(array.astype(np.int64))
        masks.append(mask)
        digest.update(np.int64(array.size).tobytes() + ids[-1].tobytes() + np.packbits(mask).tobytes())
    return ids, masks, digest.hexdigest()


def _differences(found: Mapping[str, Any], wanted: Mapping[str, Any]) -> list[str]:
    """'key found, not wanted' for every key where they differ."""
    out = []
    for key, value in wanted.items():
        have = found.get(key)
        same = isinstance(value, float) and isinstance(have, (int, float)) and math.isclose(have, value, rel_tol=1e-9)
        if not same and have != value:
            out.append(f"{key} {have!r}, not {value!r}")
    return out


def _score(
    teacher: LogitsFn, ids: list[np.ndarray], masks: list[np.ndarray], codec: Codec, temperature: float
) -> np.ndarray:
    """Records of the scored positions of a few sequences, sequence after sequence."""
    width = max(len(a) for a in ids)
    input_ids = torch.zeros(len(ids), width, dtype=torch.long)  # (B, T) right-padded with id 0
    attention = torch.zeros(len(ids), width, dtype=torch.long)  # (B, T)
    scored = torch.zeros(len(ids), width, dtype=torch.bool)  # (B, T)
    for row, (array, mask) in enumerate(zip(ids, masks)):
        input_ids[row, : len(array)] = torch.from_numpy(array)
        attention[row, : len(array)] = 1
        scored[row, : len(array)] = torch.from_numpy(mask)
    with torch.inference_mode():
        logits = teacher(input_ids, attention)  # (B, T, V)
        if logits.shape != (*input_ids.shape, codec.vocab_size):
            raise CacheError(
                f"the teacher returned logits of shape {tuple(logits.shape)} for a batch of {tuple(input_ids.shape)} "
                f"tokens; expected (B, T, {codec.vocab_size}): check vocab_size and the teacher's output"
            )
        chosen = logits[scored.to(logits.device)].float()  # (n, V)
        logprobs = F.log_softmax(chosen if temperature == 1.0 else chosen / temperature, dim=-1)  # (n, V)
        top, top_ids = logprobs.topk(codec.top_k, dim=-1)  # (n, K), (n, K)
        log_tail = logprobs.scatter(-1, top_ids, float("-inf")).logsumexp(-1)  # (n,)
    return codec.encode(top.cpu().numpy(), top_ids.cpu().numpy(), log_tail.cpu().numpy())


def build_token_cache(
    teacher: LogitsFn,
    sequences: Sequence[np.ndarray | Tensor],
    directory: Path | str,
    *,
    scored: Sequence[np.ndarray | Tensor] | None = None,
    top_k: int,
    temperature: float = 1.0,
    teacher_name: str,
    teacher_revision: str,
    tokenizer_hash: str,
    vocab_size: int,
    data_id: str,
    batch_size: int = 8,
    shard_tokens: int = 1 << 20,
    reporter: Reporter = NULL,
) -> dict[str, Any]:
    """Score `sequences` (1-D token ids) with `teacher` and store the top-`top_k` log-probs of the positions that
    `scored` marks (default: all but the last of each sequence); return the manifest.

    A killed build (even SIGKILL) resumes from its finished shards without rescoring them; a finished cache for
    the same teacher, data and settings is reused as it is; a directory holding another cache is refused.
    """
    codec = Codec.for_sizes(top_k, vocab_size)
    ids, masks, _ = _as_inputs(sequences, scored, vocab_size)

    def score(rows: slice) -> np.ndarray:
        return _score(teacher, ids[rows], masks[rows], codec, temperature)

    return build_scored_cache(
        score, ids, directory, scored=masks, codec=codec, temperature=temperature, teacher_name=teacher_name,
        teacher_revision=teacher_revision, tokenizer_hash=tokenizer_hash, data_id=data_id, batch_size=batch_size,
        shard_tokens=shard_tokens, reporter=reporter,
    )  # fmt: skip


def build_scored_cache(
    score: Callable[[slice], np.ndarray],
    sequences: Sequence[np.ndarray | Tensor],
    directory: Path | str,
    *,
    scored: Sequence[np.ndarray | Tensor] | None = None,
    codec: Codec,
    temperature: float,
    teacher_name: str,
    teacher_revision: str,
    tokenizer_hash: str,
    data_id: str,
    identity: Mapping[str, Any] | None = None,
    notes: Callable[[], Mapping[str, Any]] | None = None,
    batch_size: int = 8,
    shard_tokens: int = 1 << 20,
    reporter: Reporter = NULL,
) -> dict[str, Any]:
    """`build_token_cache` for a teacher scored by the caller (a model behind a server, `served_cache`):
    `score(rows)` returns the records (`codec.encode`) of the positions `scored` marks in sequences rows.start ..
    rows.stop - 1, in data order. It is called only for the sequences after the finished shards, in order,
    `batch_size` sequences at a time, and never for a finished cache (reused as it is). `identity` adds fields that
    a resumed or reused build must match; `notes()` adds fields to the manifest when it is written."""
    if temperature <= 0 or batch_size < 1 or shard_tokens < 1:
        raise ValueError("temperature, batch_size and shard_tokens must be positive")
    ids, masks, data_sha256 = _as_inputs(sequences, scored, codec.vocab_size)
    counts = np.array([int(m.sum()) for m in masks], np.int64)  # (N,)
    described = _identity(codec, temperature, teacher_name, teacher_revision, tokenizer_hash, data_id,
                          data_sha256, ids, counts)  # fmt: skip
    described.update(identity or {})
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    finished = _finished(directory, described)
    if finished is not None:
        reporter.event("token cache reused", directory=str(directory))
        return finished
    shards = resumable_shards(directory, described)
    reporter.stage("teacher top-k cache", total=described["positions"])
    reporter.advance(sum(s["rows"] for s in shards))
    start = sum(s["sequences"] for s in shards)
    for first, stop, records in _scored_shards(score, counts, start, batch_size, shard_tokens, codec, reporter):
        if records.dtype != codec.record_dtype or len(records) != counts[first:stop].sum():
            raise ValueError(
                f"score returned {len(records)} records of {records.dtype} for sequences {first}..{stop - 1}"
            )
        _write_shard(directory, described, shards, records, first, stop)
    reporter.end()
    return _finish(directory, described, shards, ids, masks, counts, notes() if notes else None)


def _finished(directory: Path, identity: dict[str, Any]) -> dict[str, Any] | None:
    """The manifest of a finished cache of `identity` in `directory` (its files checked), or None when there is
    none yet; CacheError when the directory holds a cache or an unfinished build for other settings."""
    for name in (MANIFEST, PARTIAL):
        if (directory / name).exists():
            found = read_json(directory / name)
            differ = _differences(found, identity)
            if differ:
                what = "a cache" if name == MANIFEST else "an unfinished build"
                raise CacheError(
                    f"{directory} holds {what} for other settings ({'; '.join(differ[:4])}); "
                    "choose another directory or delete this one"
                )
            if name == MANIFEST:
                TokenCache(directory)  # the files are there and have the right shapes
                return found
    return None


def _scored_shards(
    score: Callable[[slice], np.ndarray],
    counts: np.ndarray,
    start: int,
    batch_size: int,
    shard_tokens: int,
    codec: Codec,
    reporter: Reporter,
) -> Iterator[tuple[int, int, np.ndarray]]:
    """(first sequence, stop, records (rows,)) of each shard from sequence `start` on, scored `batch_size` sequences
    at a time (`score`); a shard closes at `shard_tokens` records or more, the last with what is left."""
    parts: list[np.ndarray] = []
    first = sequence = start
    while sequence < len(counts):
        if reporter.cancelled():
            raise Cancelled("the teacher cache build was cancelled; run it again to resume")
        stop = min(sequence + batch_size, len(counts))
        if counts[sequence:stop].sum():
            parts.append(score(slice(sequence, stop)))
            reporter.advance(len(parts[-1]))
        sequence = stop
        if sum(len(p) for p in parts) >= shard_tokens or sequence == len(counts):
            yield first, sequence, np.concatenate(parts) if parts else np.zeros(0, codec.record_dtype)
            first, parts = sequence, []


def _write_shard(
    directory: Path, identity: dict[str, Any], shards: list[dict[str, Any]], records: np.ndarray, first: int, stop: int
) -> None:
    """Write the records (rows,) of sequences first..stop-1 as the next shard and note it in the partial file."""
    name = f"shard-{len(shards):05d}.npy"
    row = sum(s["rows"] for s in shards)
    add_shard(directory, identity, shards, name, records, first_sequence=first, sequences=stop - first,
              first_row=row, rows=len(records))  # fmt: skip


def _finish(
    directory: Path,
    identity: dict[str, Any],
    shards: list[dict[str, Any]],
    ids: list[np.ndarray],
    masks: list[np.ndarray],
    counts: np.ndarray,
    notes: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Write the index, then the manifest (last: its presence marks a finished cache); return the manifest."""
    digest = write_file(
        directory / INDEX,
        lambda handle: np.savez(
            handle,
            lengths=np.array([len(a) for a in ids], np.uint32),
            scored=counts.astype(np.uint32),
            mask=np.packbits(np.concatenate(masks) if masks else np.zeros(0, bool)),
        ),
    )
    manifest = {**identity, **(notes or {}), "index": {"file": INDEX, "sha256": digest}, "shards": shards}
    finish(directory, manifest)
    return manifest


def write_token_cache(
    records: np.ndarray,
    sequences: Sequence[np.ndarray | Tensor],
    scored: Sequence[np.ndarray | Tensor],
    directory: Path | str,
    *,
    codec: Codec,
    temperature: float,
    teacher_name: str,
    teacher_revision: str,
    tokenizer_hash: str,
    data_id: str,
    shard_tokens: int = 1 << 20,
) -> dict[str, Any]:
    """Store records already made (`codec.encode`, one per position that `scored` marks, in data order) as a token
    cache: for teachers scored elsewhere, such as the top log-probs an API returned. Returns the manifest."""
    ids, masks, data_sha256 = _as_inputs(sequences, scored, codec.vocab_size)
    counts = np.array([int(m.sum()) for m in masks], np.int64)  # (N,)
    if records.dtype != codec.record_dtype or records.shape != (int(counts.sum()),):
        raise ValueError(f"{records.shape} records of {records.dtype} for {int(counts.sum())} scored positions")
    identity = _identity(codec, temperature, teacher_name, teacher_revision, tokenizer_hash, data_id,
                         data_sha256, ids, counts)  # fmt: skip
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if (directory / MANIFEST).exists() or (directory / PARTIAL).exists():
        raise CacheError(f"{directory} already holds a cache; choose another directory or delete this one")
    shards: list[dict[str, Any]] = []
    first, row = 0, 0
    ends = np.cumsum(counts)  # (N,) records up to and including each sequence
    while True:  # whole sequences per shard, about shard_tokens records each; at least one shard
        stop = min(max(int(np.searchsorted(ends, row + shard_tokens, side="right")), first + 1), len(ids))
        end = int(ends[stop - 1]) if stop else 0
        _write_shard(directory, identity, shards, records[row:end], first, stop)
        first, row = stop, end
        if first >= len(ids):
            break
    return _finish(directory, identity, shards, ids, masks, counts)


def _identity(
    codec: Codec,
    temperature: float,
    teacher_name: str,
    teacher_revision: str,
    tokenizer_hash: str,
    data_id: str,
    data_sha256: str,
    ids: list[np.ndarray],
    counts: np.ndarray,
) -> dict[str, Any]:
    """What a cache is of: the manifest's fields before its files."""
    return {
        "format": FORMAT,
        "version": VERSION,
        "teacher_name": teacher_name,
        "teacher_revision": teacher_revision,
        "tokenizer_hash": tokenizer_hash,
        "vocab_size": codec.vocab_size,
        "top_k": codec.top_k,
        "temperature": float(temperature),
        "data_id": data_id,
        "data_sha256": data_sha256,
        "sequences": len(ids),
        "tokens": int(sum(len(a) for a in ids)),
        "positions": int(counts.sum()),
        "quantisation": codec.params(),
    }


def _manifest(directory: Path) -> dict[str, Any]:
    """The manifest, checked for format, version and fields; CacheError for a missing, unfinished or bad one."""
    path = directory / MANIFEST
    if not path.exists():
        if (directory / PARTIAL).exists():
            raise CacheError(f"{directory} holds an unfinished token cache build; run the build again to resume it")
        raise CacheError(f"{directory} has no {MANIFEST}: not a token cache; build one with build_token_cache")
    manifest = read_json(path)
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise CacheError(f"{path} is not a {FORMAT} v{VERSION} manifest; rebuild the cache with this version")
    try:
        for key in ("sequences", "tokens", "positions", "vocab_size", "top_k"):
            int(manifest[key])
        float(manifest["temperature"])
        for entry in [manifest["index"], *manifest["shards"]]:
            str(entry["file"]), str(entry["sha256"])
        shards = manifest["shards"]
        starts = [(int(s["first_sequence"]), int(s["first_row"])) for s in shards]
        ends = [(0, 0)] + [(a + int(s["sequences"]), b + int(s["rows"])) for (a, b), s in zip(starts, shards)]
    except (KeyError, TypeError, ValueError) as error:
        raise CacheError(f"{path} is malformed ({type(error).__name__}: {error}); rebuild the cache") from None
    if starts != ends[:-1] or ends[-1] != (manifest["sequences"], manifest["positions"]):
        raise CacheError(f"{path} lists shards that do not cover its sequences and positions; rebuild the cache")
    return manifest


class TokenCache:
    """A finished token cache, memory-mapped, serving `TeacherOutput`s for batches of sequence indices.

    `expect` names what the caller requires (any of teacher_name, teacher_revision, tokenizer_hash, vocab_size,
    top_k, temperature, data_id); a cache that differs is refused with a CacheError saying what differs.
    """

    def __init__(self, directory: Path | str, *, expect: Mapping[str, Any] | None = None):
        self.directory = Path(directory)
        manifest = _manifest(self.directory)
        unknown = set(expect or {}) - set(EXPECTABLE)
        if unknown:
            raise ValueError(f"cannot expect {sorted(unknown)} of a token cache; choose from {list(EXPECTABLE)}")
        differ = _differences(manifest, expect or {})
        if differ:
            raise CacheError(
                f"token cache {self.directory} was built with {'; '.join(differ)}; rebuild it or open another"
            )
        self.manifest = manifest
        self.codec = Codec.from_params(manifest["quantisation"])
        self.num_classes = self.codec.vocab_size
        self.top_k = self.codec.top_k
        self.temperature = float(manifest["temperature"])
        index_path = self.directory / INDEX
        try:
            with np.load(index_path) as index:
                self.lengths = index["lengths"].astype(np.int64)  # (N,)
                counts = index["scored"].astype(np.int64)  # (N,)
                self.mask = index["mask"]  # (ceil(tokens / 8),) uint8
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as error:
            raise CacheError(f"cache index {index_path} is unreadable ({error}); rebuild the cache") from None
        n, tokens = manifest["sequences"], manifest["tokens"]
        if (
            self.lengths.shape != (n,)
            or counts.shape != (n,)
            or self.lengths.sum() != tokens
            or counts.sum() != manifest["positions"]
            or self.mask.shape != ((tokens + 7) // 8,)
        ):
            raise CacheError(f"cache index {index_path} does not match the manifest's counts; rebuild the cache")
        self.token_start = np.concatenate([[0], np.cumsum(self.lengths)])  # (N+1,)
        self.row_start = np.concatenate([[0], np.cumsum(counts)])  # (N+1,)
        self.shards: list[np.ndarray] = []  # each (rows,) records, memory-mapped
        self.shard_rows = np.array([int(s["first_row"]) for s in manifest["shards"]], np.int64)  # (shards,)
        for shard in manifest["shards"]:
            path = self.directory / shard["file"]
            check_file(path, None, "cache shard")
            try:
                records = np.load(path, mmap_mode="r")
            except (OSError, ValueError) as error:
                raise CacheError(f"cache shard {path} is unreadable ({error}); rebuild the cache") from None
            if records.dtype != self.codec.record_dtype or records.shape != (shard["rows"],):
                raise CacheError(
                    f"cache shard {path} holds {records.shape} {records.dtype}, not what the manifest says"
                )
            self.shards.append(records)

    def __len__(self) -> int:
        return len(self.lengths)

    def _records(self, rows: np.ndarray) -> np.ndarray:
        """The records of global rows (n,), gathered from the shards that hold them (one loop step per shard)."""
        shard = np.searchsorted(self.shard_rows, rows, side="right") - 1  # (n,)
        if len(self.shards) == 1 or (rows.size and shard.min() == shard.max()):
            s = int(shard[0]) if rows.size else 0
            return self.shards[s][rows - self.shard_rows[s]]
        out = np.empty(rows.size, self.codec.record_dtype)
        for s in np.unique(shard):
            chosen = shard == s
            out[chosen] = self.shards[s][rows[chosen] - self.shard_rows[s]]
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
        records = self._records(rows)  # (n,)
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
    """Check every file's sha256 and the index against the manifest; return a summary. CacheError when not sound."""
    directory = Path(directory)
    manifest = _manifest(directory)
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
    files = [MANIFEST, manifest["index"]["file"], *(s["file"] for s in manifest["shards"])]
    size = sum((directory / name).stat().st_size for name in files)
    positions = int(manifest["positions"])
    return {
        "sequences": int(manifest["sequences"]),
        "positions": positions,
        "tokens": int(manifest["tokens"]),
        "shards": len(manifest["shards"]),
        "top_k": cache.top_k,
        "vocab_size": cache.num_classes,
        "id_dtype": cache.codec.id_dtype.name,
        "bytes": size,
        "bytes_per_position": size / max(positions, 1),
        "kl_bound": cache.codec.kl_bound(),
    }
