"""The shard files of a token cache, as each format version stores the records (`token_codec`) of its positions.

**Version 1** (read only): `shard-NNNNN.npy` holds the records as they are, (rows,) of `Codec.record_dtype`: the
K ids take 2 bytes each (4 past 65,536 tokens), 256 of the 298 bytes of a record at K = 128.

**Version 2** (written): the ids entropy-coded. `shard-NNNNN.npy` is one uint8 vector of four sections, each starting
on a multiple of 8 bytes:

    values    (rows,) the records without their ids: tail, step and depth bits, as `token_codec` writes them
    offsets   (rows + 1,) uint32 (uint64 when the ids take 2^32 bits or more): the first bit of each position's ids
              in `stream`, then the end of the last
    code      (bands, V) uint8: the Huffman code lengths of the ids, one code per band of ranks (`rank_bands`)
    stream    every position's K ids, most probable first, each in its rank band's code (`huffman`), position
              after position with no gaps, then 8 bytes of padding

A position's ids are those of the most likely tokens, whose frequencies are far from uniform (a top-128 of a 2,048
token vocabulary is mostly drawn from a few hundred common tokens), and a band of ranks has its own code (the most
likely token is distributed unlike the 100th): the codes are fitted to each shard's own ids when it is written,
which costs V bytes per band and shard. The manifest's entry of a shard gives `rows` and `id_bits` (the stream's
length in bits), which fix every section's size; opening a shard checks the file against them, and reading checks
that each position's bits hold exactly its K codewords, so a damaged or crafted shard is refused rather than read
as other tokens.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

import numpy as np

from distill.errors import CacheError
from distill.teachers import huffman
from distill.teachers.token_codec import Codec

ALIGN = 8
VALUE_FIELDS = ("tail", "step", "bits")
STORAGE = {
    "ids": "canonical Huffman codes per band of ranks, fitted to each shard (token_shards)",
    "rank_bands": "floor(log2(rank + 1)), the last band taking the ranks above it",
    "max_code_bits": huffman.MAX_BITS,
}  # how version 2 stores the records: the manifest's "storage"


def rank_bands(top_k: int) -> np.ndarray:
    """(K,) the band of each rank 0..K-1: floor(log2(rank + 1)), the last band also taking the ranks above it
    (K = 128: ranks 0 | 1-2 | 3-6 | 7-14 | 15-30 | 31-62 | 63-127)."""
    last = max(int(np.log2(top_k + 1)) - 1, 0)
    return np.minimum(np.floor(np.log2(np.arange(top_k) + 1.0)).astype(np.int64), last)


def value_dtype(codec: Codec) -> np.dtype:
    """A record without its ids."""
    record = codec.record_dtype
    return np.dtype([(name, record[name]) for name in VALUE_FIELDS])


def layout(codec: Codec, rows: int, id_bits: int) -> dict[str, tuple[int, int]]:
    """(first byte, bytes) of each section of a version-2 shard of `rows` positions whose ids take `id_bits` bits;
    "end" holds the file's data length."""
    sizes = {
        "values": rows * value_dtype(codec).itemsize,
        "offsets": (rows + 1) * offset_dtype(id_bits).itemsize,
        "code": (int(rank_bands(codec.top_k).max()) + 1) * codec.vocab_size,
        "stream": (id_bits + 7) // 8 + 8,
    }
    out, at = {}, 0
    for name, size in sizes.items():
        out[name] = (at, size)
        at += -(-size // ALIGN) * ALIGN
    out["end"] = (at, 0)
    return out


def offset_dtype(id_bits: int) -> np.dtype:
    return np.dtype("<u4" if id_bits < 1 << 32 else "<u8")


def pack(records: np.ndarray, codec: Codec) -> tuple[np.ndarray, int]:
    """A version-2 shard (bytes,) uint8 of records (rows,), and its `id_bits`; ValueError for an id outside the
    vocabulary."""
    ids = records["ids"].astype(np.int64)  # (rows, K)
    if ids.size and (ids.min() < 0 or ids.max() >= codec.vocab_size):
        raise ValueError(f"a record holds a token id outside the vocabulary of {codec.vocab_size}")
    bands = rank_bands(codec.top_k)  # (K,)
    lengths = np.stack(
        [huffman.code_lengths(np.bincount(ids[:, bands == b].ravel(), minlength=codec.vocab_size))
         for b in range(int(bands.max()) + 1)]
    )  # fmt: skip  # (bands, V)
    stream, offsets = huffman.encode(ids, [huffman.Table.from_lengths(row) for row in lengths], bands)
    id_bits = int(offsets[-1])
    sections = layout(codec, len(records), id_bits)
    out = np.zeros(sections["end"][0], np.uint8)
    values = np.empty(len(records), value_dtype(codec))
    for name in VALUE_FIELDS:
        values[name] = records[name]
    for name, array in (
        ("values", values), ("offsets", offsets.astype(offset_dtype(id_bits))), ("code", lengths), ("stream", stream)
    ):  # fmt: skip
        first = sections[name][0]
        out[first : first + array.nbytes] = np.frombuffer(array.tobytes(), np.uint8)
    return out, id_bits


class Shard(Protocol):
    rows: int

    def records(self, rows: np.ndarray) -> np.ndarray:
        """The records (n,) of `Codec.record_dtype` at the shard's rows (n,)."""
        ...


def open_shard(path: Path, entry: dict[str, Any], codec: Codec, version: int) -> Shard:
    """The shard that a manifest `entry` describes, memory-mapped; CacheError when the file does not match it."""
    try:
        array = np.load(path, mmap_mode="r")
    except (OSError, ValueError) as error:
        raise CacheError(f"cache shard {path} is unreadable ({error}); rebuild the cache") from None
    if version == 1:
        if array.dtype != codec.record_dtype or array.shape != (entry["rows"],):
            raise CacheError(f"cache shard {path} holds {array.shape} {array.dtype}, not what the manifest says")
        return RecordShard(array)
    return PackedShard(path, array, codec, int(entry["rows"]), int(entry["id_bits"]))


class RecordShard:
    """Version 1: the records themselves."""

    def __init__(self, array: np.ndarray):
        self.array, self.rows = array, len(array)

    def records(self, rows: np.ndarray) -> np.ndarray:
        return self.array[rows]


class PackedShard:
    """Version 2: values, offsets, codes and the id stream, as the module docstring lays them out."""

    def __init__(self, path: Path, array: np.ndarray, codec: Codec, rows: int, id_bits: int):
        sections = layout(codec, rows, id_bits)
        if array.dtype != np.uint8 or array.shape != (sections["end"][0],):
            raise CacheError(
                f"cache shard {path} holds {array.shape} {array.dtype}, not the ({sections['end'][0]},) uint8 of "
                f"{rows} positions whose ids take {id_bits} bits (truncated or not this cache's); rebuild the cache"
            )
        part = {name: array[first : first + size] for name, (first, size) in sections.items()}
        self.path, self.codec, self.rows, self.id_bits = path, codec, rows, id_bits
        self.values = part["values"].view(value_dtype(codec))  # (rows,)
        self.offsets = part["offsets"].view(offset_dtype(id_bits))  # (rows + 1,)
        self.code = part["code"].reshape(-1, codec.vocab_size)  # (bands, V)
        self.words = huffman.words(part["stream"])  # (stream bytes - 7,) int64
        self.bands = rank_bands(codec.top_k)  # (K,)
        self._tables: list[huffman.Table] | None = None

    def tables(self) -> list[huffman.Table]:
        """The shard's codes, built on first use; CacheError when its code lengths are not a prefix code's."""
        if self._tables is None:
            try:
                self._tables = [huffman.Table.from_lengths(np.asarray(row)) for row in self.code]
            except ValueError as error:
                raise CacheError(f"cache shard {self.path} holds a broken code ({error}); rebuild the cache") from None
        return self._tables

    def records(self, rows: np.ndarray) -> np.ndarray:
        first = self.offsets[rows].astype(np.int64)  # (n,)
        end = self.offsets[rows + 1].astype(np.int64)  # (n,)
        if rows.size and ((first > end).any() or end.max() > self.id_bits):
            raise CacheError(f"cache shard {self.path} holds offsets outside its id stream (corrupt); rebuild it")
        try:
            ids = huffman.decode(self.words, first, end, self.tables(), self.bands)  # (n, K)
        except ValueError as error:
            raise CacheError(f"cache shard {self.path} holds ids that do not decode ({error}); rebuild it") from None
        out = np.empty(len(rows), self.codec.record_dtype)  # (n,)
        values = self.values[rows]  # (n,)
        for name in VALUE_FIELDS:
            out[name] = values[name]
        out["ids"] = ids
        return out
