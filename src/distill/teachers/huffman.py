"""Canonical Huffman codes for rows of symbols (a token cache's top-K ids), encoded and decoded a column at a time.

A code is given by its code lengths alone, (V,) with 0 for a symbol without a codeword. Its canonical form gives
the symbols with codewords, sorted by (length, symbol), consecutive codewords: written left-justified in
`MAX_BITS` bits, the j-th codeword starts at S_j = sum_{i<j} 2^(MAX_BITS - l_i). So a window of the next MAX_BITS
bits of a stream, read as an integer x, holds the codeword j with S_j <= x < S_{j+1}: one `searchsorted` finds it,
for every row at once.

**Rows.** n rows of K symbols are written row after row; column c of every row uses the table `tables[bucket[c]]`
(a token cache gives each band of ranks its own table: the most likely token is distributed unlike the 100th).
`encode` returns the bytes and each row's first bit, `decode` reads the K symbols of many rows in K vectorised steps
(a loop over columns, never over rows) and checks that each row ends exactly where the next begins.

**Lengths.** `code_lengths` builds the Huffman tree of the counts (heapq), and when a codeword would exceed MAX_BITS
halves the counts (keeping every seen symbol) and builds again; the code is then within a few hundredths of a bit
per symbol of the counts' entropy.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

MAX_BITS = 32  # longest codeword; a decode step reads a 64-bit word and uses MAX_BITS of it
ENCODE_ROWS = 4096  # rows packed at a time (their bits held as bytes: ENCODE_ROWS * K * MAX_BITS at most)
LOOKUP_BITS = 16  # codewords up to this long are decoded by one table lookup, longer ones by a search
WINDOW = (1 << MAX_BITS) - 1


def code_lengths(counts: np.ndarray) -> np.ndarray:
    """Huffman code lengths (V,) uint8 for symbol counts (V,): 0 for a symbol never seen, 1 for a lone one, at most
    MAX_BITS."""
    counts = np.asarray(counts, np.int64)
    lengths = np.zeros(counts.shape, np.uint8)
    seen = np.flatnonzero(counts > 0)
    if seen.size == 1:
        lengths[seen] = 1
    if seen.size <= 1:
        return lengths
    weights = counts[seen]
    while True:
        depth = _tree_depths(weights)
        if depth.max() <= MAX_BITS:
            lengths[seen] = depth
            return lengths
        weights = (weights + 1) // 2  # flatter: the tree gets shallower, every seen symbol keeps a codeword


def _tree_depths(weights: np.ndarray) -> np.ndarray:
    """Depths (m,) of the leaves of the Huffman tree of weights (m,), m >= 2."""
    m = len(weights)
    heap = [(int(w), i) for i, w in enumerate(weights)]
    heapq.heapify(heap)
    parent = np.zeros(2 * m - 1, np.int64)  # leaves 0..m-1, inner nodes m.. in order of creation, the root last
    node = m
    while len(heap) > 1:
        (w1, a), (w2, b) = heapq.heappop(heap), heapq.heappop(heap)
        parent[a] = parent[b] = node
        heapq.heappush(heap, (w1 + w2, node))
        node += 1
    depth = np.zeros(2 * m - 1, np.int64)
    for child in range(2 * m - 3, -1, -1):  # a parent is created after its children: its depth is known first
        depth[child] = depth[parent[child]] + 1
    return depth[:m]


@dataclass(frozen=True)
class Table:
    """A canonical code: for encoding `codes` (V,) and `lengths` (V,); for decoding, in canonical order, `starts`
    (m,) the left-justified first codewords, `symbols` (m,) and `sizes` (m,) their lengths, and indexed by the first
    lookup_bits bits of a window, `lookup_symbol` and `lookup_size` (2^lookup_bits,): the codeword they decide, size
    0 where they start a longer one (none when `complete`)."""

    codes: np.ndarray
    lengths: np.ndarray
    starts: np.ndarray
    symbols: np.ndarray
    sizes: np.ndarray
    lookup_symbol: np.ndarray
    lookup_size: np.ndarray
    lookup_bits: int
    complete: bool

    @classmethod
    def from_lengths(cls, lengths: np.ndarray) -> Table:
        """The canonical code of lengths (V,); ValueError when they are not those of a prefix code."""
        lengths = np.asarray(lengths)
        if lengths.ndim != 1 or (lengths.size and int(lengths.max()) > MAX_BITS):
            raise ValueError(f"code lengths must be a vector of values up to {MAX_BITS}")
        symbols = np.flatnonzero(lengths)  # (m,) ascending
        sizes = lengths[symbols].astype(np.int64)  # (m,)
        order = np.argsort(sizes, kind="stable")  # (m,) by length, then symbol
        symbols, sizes = symbols[order], sizes[order]
        span = np.left_shift(1, MAX_BITS - sizes)  # (m,) 2^(MAX_BITS - l), int64
        ends = np.cumsum(span)  # (m,)
        if sizes.size and int(ends[-1]) > 1 << MAX_BITS:
            raise ValueError("code lengths that no prefix code has (their Kraft sum exceeds 1)")
        starts = ends - span  # (m,)
        codes = np.zeros(lengths.shape, np.int64)
        codes[symbols] = np.right_shift(starts, MAX_BITS - sizes)
        bits = min(LOOKUP_BITS, int(sizes.max(initial=0)))
        prefixes = np.left_shift(np.arange(1 << bits), MAX_BITS - bits)  # (2^bits,)
        j = np.maximum(np.searchsorted(starts, prefixes, side="right") - 1, 0)  # (2^bits,) its codeword
        lookup_size = np.where(sizes[j] > bits, 0, sizes[j]) if sizes.size else np.zeros(1, np.int64)
        lookup_symbol = symbols[j] if sizes.size else np.zeros(1, np.int64)
        complete = bits == int(sizes.max(initial=0))
        return cls(codes, lengths.astype(np.int64), starts, symbols.astype(np.int64), sizes, lookup_symbol,
                   lookup_size, bits, complete)  # fmt: skip


def encode(rows: np.ndarray, tables: Sequence[Table], bucket: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The rows (n, K) of symbols as bytes (b,) uint8, and the first bit of each row and the end (n + 1,) int64.
    Column c is coded with tables[bucket[c]]; a symbol without a codeword there is a ValueError."""
    n, k = rows.shape
    parts, offsets, carry = [], [np.zeros(1, np.int64)], np.zeros(0, np.uint8)
    for begin in range(0, n, ENCODE_ROWS):
        block = rows[begin : begin + ENCODE_ROWS]  # (b, K)
        codes = np.zeros(block.shape, np.int64)  # (b, K)
        sizes = np.zeros(block.shape, np.int64)  # (b, K)
        for t, table in enumerate(tables):
            columns = bucket == t
            codes[:, columns] = table.codes[block[:, columns]]
            sizes[:, columns] = table.lengths[block[:, columns]]
        if block.size and sizes.min() == 0:
            raise ValueError("a symbol has no codeword in its column's table")
        flat_codes, flat_sizes = codes.ravel(), sizes.ravel()  # (b * K,)
        first = len(carry) + np.cumsum(flat_sizes) - flat_sizes  # (b * K,) each codeword's first bit in `bits`
        bits = np.zeros(len(carry) + int(flat_sizes.sum()), np.uint8)  # (bits,) the last block's odd bits, then ours
        bits[: len(carry)] = carry
        for j in range(int(flat_sizes.max(initial=0))):  # bit j of every codeword at once, most significant first
            has = flat_sizes > j
            bits[first[has] + j] = np.right_shift(flat_codes[has], flat_sizes[has] - 1 - j) & 1
        offsets.append(offsets[-1][-1] + np.cumsum(sizes.sum(1)))
        whole = len(bits) // 8 * 8
        parts.append(np.packbits(bits[:whole]))
        carry = bits[whole:]
    parts.append(np.packbits(carry))
    return np.concatenate(parts), np.concatenate(offsets)


def words(stream: np.ndarray) -> np.ndarray:
    """The big-endian 64-bit word starting at every byte of `stream` (b + 8,) uint8 that ends in 8 bytes of padding:
    (b + 1,) int64, a view, no copy (memory-mapped streams stay so). Signed: a right shift copies the top bit in, but
    `decode` keeps only the low MAX_BITS bits of a word shifted right by at least 25."""
    if stream.ndim != 1 or stream.dtype != np.uint8 or stream.size < 8 or not stream.flags.c_contiguous:
        raise ValueError("a code stream is a contiguous uint8 vector ending in 8 bytes of padding")
    return np.ndarray((stream.size - 7,), np.dtype(">i8"), buffer=stream, strides=(1,))


def decode(
    stream_words: np.ndarray, first: np.ndarray, end: np.ndarray, tables: Sequence[Table], bucket: np.ndarray
) -> np.ndarray:
    """The symbols (n, K) int64 of the rows whose bits run from first (n,) to end (n,) in the stream read as
    `words(stream)`, K = len(bucket). ValueError when a row's bits do not hold exactly K codewords."""
    n, k = len(first), len(bucket)
    out = np.empty((k, n), np.int64)  # filled a column at a time, returned transposed
    if not n:
        return out.T
    position = first.astype(np.int64)  # (n,) the next bit of each row
    last = len(stream_words) - 1
    for c in range(k):
        table = tables[int(bucket[c])]
        if not table.symbols.size:
            raise ValueError("a column's table has no codewords")
        byte = np.minimum(position >> 3, last)  # (n,) clipped: a corrupt row reads garbage, then fails the check
        skip = 64 - MAX_BITS - (position & 7)  # (n,) 64 - MAX_BITS - the bits of the byte already read
        window = (stream_words[byte] >> skip) & WINDOW  # (n,) the next MAX_BITS bits
        prefix = window >> (MAX_BITS - table.lookup_bits)  # (n,)
        symbol, size = table.lookup_symbol[prefix], table.lookup_size[prefix]  # (n,), (n,): 0 for longer codewords
        longer = np.zeros(0, np.int64) if table.complete else np.flatnonzero(size == 0)  # rare symbols
        if longer.size:
            j = np.searchsorted(table.starts, window[longer], side="right") - 1
            symbol[longer], size[longer] = table.symbols[j], table.sizes[j]
        out[c] = symbol
        position += size
    if not np.array_equal(position, end):
        raise ValueError("a row's bits do not hold exactly its codewords")
    return out.T
