"""Building a teacher LM's top-K next-token log-probs cache: scored once over the training data, then read
memory-mapped by every epoch and every student (score once, train many) through `TokenCache`.

The directory's layout, and how it is read, are in `distill.teachers.token_cache_read` (`TokenCache` and
`verify_token_cache` are importable from here too); the record of a position and its error bound in
`distill.teachers.token_codec`; how shards store the records (ids entropy-coded) in `distill.teachers.token_shards`.
The files are written, resumed and checked as `distill.teachers.cache_files` describes.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distill.errors import CacheError
from distill.progress import NULL, Cancelled, Reporter
from distill.teachers.cache_files import (
    MANIFEST,
    PARTIAL,
    add_shard,
    finish,
    read_json,
    resumable_shards,
    write_file,
)
from distill.teachers.local import logits_of
from distill.teachers.token_cache_read import FORMAT, INDEX, VERSION, TokenCache, differences, verify_token_cache
from distill.teachers.token_codec import Codec
from distill.teachers.token_shards import STORAGE, pack

__all__ = [
    "TokenCache",
    "build_scored_cache",
    "build_token_cache",
    "causal_lm_logits",
    "verify_token_cache",
    "write_token_cache",
]
NOT_COMPARED = ("version", "storage")  # a finished cache of another format version is reused, not rebuilt

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
        _write_shard(directory, described, shards, records, first, stop, codec)
    reporter.end()
    return _finish(directory, described, shards, ids, masks, counts, notes() if notes else None)


def _finished(directory: Path, identity: dict[str, Any]) -> dict[str, Any] | None:
    """The manifest of a finished cache of `identity` in `directory` (its files checked), or None when there is
    none yet; CacheError when the directory holds a cache or an unfinished build for other settings."""
    for name in (MANIFEST, PARTIAL):
        if (directory / name).exists():
            found = read_json(directory / name)
            differ = differences(found, {k: v for k, v in identity.items() if k not in NOT_COMPARED})
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
    directory: Path,
    identity: dict[str, Any],
    shards: list[dict[str, Any]],
    records: np.ndarray,
    first: int,
    stop: int,
    codec: Codec,
) -> None:
    """Write the records (rows,) of sequences first..stop-1 as the next shard (`token_shards.pack`) and note it in
    the partial file."""
    name = f"shard-{len(shards):05d}.npy"
    row = sum(s["rows"] for s in shards)
    packed, id_bits = pack(records, codec)
    add_shard(directory, identity, shards, name, packed, first_sequence=first, sequences=stop - first,
              first_row=row, rows=len(records), id_bits=id_bits)  # fmt: skip


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
        _write_shard(directory, identity, shards, records[row:end], first, stop, codec)
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
        "storage": STORAGE,
    }
