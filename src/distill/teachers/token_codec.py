"""How one scored position of a teacher LM's top-K next-token distribution is stored: a fixed-size record.

A position's top-K log-probs l_0 >= l_1 >= ... >= l_{K-1} (at the cache's temperature) and the teacher's remaining
mass t = 1 - sum_i exp(l_i) (the tail bucket of `distill.losses.sparse_pair`) are written as one record:

    tail   float16   log t, rounded to nearest (-inf when K == V)
    step   uint8     code c of the grid step  D_c = step_max * 2 ** ((c - 255) / 16)
    ids    uint16    the K token ids, most probable first (uint32 when V > 65,536)
    bits   uint8     the sorted depths d_i = l_0 - l_i (i = 1..K-1) on the grid {0, D, 2D, ..., L D}, unary-coded

**Depths on a grid, unary-coded.** Each depth is rounded to q_i = round(d_i / D), clipped to L (`levels`). The q_i
never decrease, so the record writes, for i = 1..K-1, (q_i - q_{i-1}) zeros and then a one: K - 1 ones and at most
L zeros, K - 1 + L bits in all. A sorted list of n values on an L-step grid is a multiset, and n + L bits is within
a few per cent of log2 C(n + L, n), the least any fixed-size code can spend on it. Each position gets the finest step
of the ladder that spans its own depth range (D >= d_{K-1} / L, at most `step_max`): flat distributions get a fine
grid, peaked ones a coarser grid, which costs little because their lower entries carry little mass.
With L = 185 and K = 128 a record is 2 + 1 + 256 + 39 = 298 bytes (K = 64: 2 + 1 + 128 + 31 = 162 bytes).

**Decoding.** The top entry's depth is exactly 0; the others come back as -q_i D. The top-K part is renormalised to
the stored top-K mass M' = 1 - t' (t' from the float16 tail), so the tail bucket is kept (to float16 precision)
whatever the rounding of the depths.

**Error bound.** Write p_hat for the exact top-K distribution renormalised and delta_i for the log-error of entry i
before renormalisation (delta_0 = 0). Then KL(p_hat || p_hat') = log sum_i p_hat_i e^delta_i - sum_i p_hat_i delta_i
<= sum_i p_hat_i phi(delta_i) with phi(x) = e^x - 1 - x (since log z <= z - 1). An entry on the grid has
|delta_i| <= D / 2 <= step_max / 2; an entry deeper than L * step_max (clipped) has delta_i > 0 and
p_hat_i phi(delta_i) < p_hat_i e^delta_i = p_hat_0 e^(-L step_max). Hence

    KL(p_hat || p_hat') <= (1 - p_hat_0) phi(step_max / 2) + (K - 1) p_hat_0 e^(-L step_max)
                        <= max(phi(step_max / 2), (K - 1) e^(-L step_max))

which is 9.8e-4 nats for step_max = 0.088, L = 185 and any K <= 128, for *any* distribution (`kl_bound`). Over the
K + 1 buckets the loss sees, KL = KL_binary(M, t || M', t') + M KL(p_hat || p_hat'); float16 keeps log t to a
relative 2^-11, which bounds the first term below 1e-7. Rounding errors are in practice spread over [-D/2, D/2],
so the typical KL is near (1 - p_hat_0) D^2 / 24, far below the bound (see benchmarks/lm_cache.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from distill.errors import CacheError

SCHEME = "unary-sorted-depths"
STEP_MAX = 0.088  # nats; phi(0.044) = 9.8e-4
MIN_LEVELS = 184  # the grid spans at least 184 steps (16.2 nats at step_max); rounded up to whole bytes
STEP_CODES = 256
STEPS_PER_OCTAVE = 16
DECODE_ROWS = 512  # positions decoded at a time
LOG_TAIL_MAX = -6e-8  # the largest float16 below 0: a position's top-K mass is never stored as exactly 0


@dataclass(frozen=True)
class Codec:
    """The record format for one (top_k, vocab_size, levels, step_max); `params()` goes into the manifest."""

    top_k: int
    vocab_size: int
    levels: int
    step_max: float = STEP_MAX

    @classmethod
    def for_sizes(cls, top_k: int, vocab_size: int) -> Codec:
        """The default format: at least MIN_LEVELS grid steps, as many more as fill the last byte of `bits`."""
        if not 1 <= top_k <= vocab_size:
            raise ValueError(f"top_k must be between 1 and the vocabulary size {vocab_size}, not {top_k}")
        levels = 0 if top_k == 1 else MIN_LEVELS + (-(top_k - 1 + MIN_LEVELS)) % 8
        return cls(top_k, vocab_size, levels)

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> Codec:
        """The codec a manifest describes; CacheError when it is not one this version reads."""
        try:
            codec = cls(
                int(params["top_k"]), int(params["vocab_size"]), int(params["levels"]), float(params["step_max"])
            )
            known = params["scheme"] == SCHEME and params["record_bytes"] == codec.record_bytes
        except (KeyError, TypeError, ValueError):
            known = False
        if not known:
            raise CacheError(f"the cache's quantisation {params} is not {SCHEME} as this version writes it; rebuild it")
        return codec

    @property
    def id_dtype(self) -> np.dtype:
        return np.dtype(np.uint16 if self.vocab_size <= 1 << 16 else np.uint32)

    @property
    def bits(self) -> int:
        return 0 if self.top_k == 1 else self.top_k - 1 + self.levels

    @property
    def record_dtype(self) -> np.dtype:
        return np.dtype(
            [("tail", "<f2"), ("step", "u1"), ("ids", self.id_dtype.newbyteorder("<"), (self.top_k,)),
             ("bits", "u1", (self.bits // 8,))]
        )  # fmt: skip

    @property
    def record_bytes(self) -> int:
        return self.record_dtype.itemsize

    @property
    def steps(self) -> np.ndarray:
        """(256,) the step ladder D_c, float64."""
        return self.step_max * 2.0 ** ((np.arange(STEP_CODES) - (STEP_CODES - 1)) / STEPS_PER_OCTAVE)

    def kl_bound(self) -> float:
        """Worst-case KL(exact || cached) over the renormalised top-K, any distribution (module docstring)."""
        half = self.step_max / 2
        return max(math.expm1(half) - half, (self.top_k - 1) * math.exp(-self.levels * self.step_max))

    def params(self) -> dict[str, Any]:
        return {
            "scheme": SCHEME,
            "top_k": self.top_k,
            "vocab_size": self.vocab_size,
            "levels": self.levels,
            "step_max": self.step_max,
            "step_codes": STEP_CODES,
            "steps_per_octave": STEPS_PER_OCTAVE,
            "id_dtype": self.id_dtype.name,
            "tail": "float16 log of the mass outside the top-K",
            "record_bytes": self.record_bytes,
            "kl_bound": self.kl_bound(),
        }

    def encode(self, top_logprobs: np.ndarray, top_ids: np.ndarray, log_tail: np.ndarray) -> np.ndarray:
        """Records for n positions: top-K log-probs (n, K), their ids (n, K), log tail mass (n,). Any order of the
        K entries is accepted (they are sorted here)."""
        n, k = top_logprobs.shape
        if k != self.top_k or top_ids.shape != (n, k) or log_tail.shape != (n,):
            raise ValueError(f"expected (n, {self.top_k}) log-probs and ids and (n,) tails, got {top_logprobs.shape}")
        order = np.argsort(-top_logprobs, axis=1, kind="stable")  # (n, K)
        values = np.take_along_axis(top_logprobs.astype(np.float64), order, axis=1)  # (n, K), descending
        records = np.zeros(n, self.record_dtype)
        records["ids"] = np.take_along_axis(top_ids, order, axis=1)
        records["tail"] = np.minimum(log_tail, LOG_TAIL_MAX).astype(np.float16)
        if k == 1:
            return records
        depth = values[:, :1] - values[:, 1:]  # (n, K-1), >= 0 and non-decreasing
        need = depth[:, -1] / self.levels  # (n,) the finest step that spans this position's range
        with np.errstate(divide="ignore"):
            code = np.ceil((STEP_CODES - 1) + STEPS_PER_OCTAVE * np.log2(need / self.step_max))
        code = np.clip(np.nan_to_num(code, nan=0.0, neginf=0.0), 0, STEP_CODES - 1).astype(np.int64)  # (n,)
        steps = self.steps
        code = np.where((steps[code] < need) & (code < STEP_CODES - 1), code + 1, code)  # float rounding of log2
        records["step"] = code
        levels = np.minimum(np.rint(depth / steps[code][:, None]), self.levels).astype(np.int64)  # (n, K-1)
        ones = levels + np.arange(k - 1)  # (n, K-1) bit positions of the ones, strictly increasing per row
        bits = np.zeros((n, self.bits), np.uint8)  # (n, bits)
        np.put_along_axis(bits, ones, 1, axis=1)
        records["bits"] = np.packbits(bits, axis=1)  # (n, bits / 8)
        return records

    def decode(self, records: np.ndarray) -> np.ndarray:
        """Top-K log-probs (n, K) float32, most probable first: those of the ids `records["ids"]`, in that order."""
        out = np.empty((len(records), self.top_k), np.float32)  # (n, K)
        for begin in range(0, len(records), DECODE_ROWS):  # blocks whose temporaries stay in the CPU's cache
            self._decode_block(records[begin : begin + DECODE_ROWS], out[begin : begin + DECODE_ROWS])
        return out

    def _decode_block(self, records: np.ndarray, out: np.ndarray) -> None:
        n, k = len(records), self.top_k
        log_mass = np.log(-np.expm1(records["tail"].astype(np.float32)))  # (n,) log of the top-K mass
        out[:, 0] = 0.0  # out holds log-probs minus the top one's until the last line
        if k > 1:
            bits = np.unpackbits(records["bits"], axis=1).view(bool)  # (n, bits)
            ones = np.flatnonzero(bits)  # (n * (K-1),) flat positions of the ones, row by row
            if ones.size != n * (k - 1):
                raise CacheError("a cache record does not hold K - 1 depths (corrupt shard); run verify and rebuild")
            depth = ones.astype(np.int32).reshape(n, k - 1)  # (n, K-1) bit position of each one, made its level
            first: np.ndarray = np.arange(n, dtype=np.int32)[:, None] * self.bits + np.arange(k - 1, dtype=np.int32)
            depth -= first  # (n, K-1): bit position minus the ones before it and the row's start
            out[:, 1:] = depth
            out[:, 1:] *= -self.steps.astype(np.float32)[records["step"]][:, None]
        log_norm = np.log(np.exp(out).sum(axis=1))  # (n,) out <= 0 and its max is 0: no overflow
        out += (log_mass - log_norm)[:, None]
