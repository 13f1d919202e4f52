"""A token cache from the top log-probs a teacher API returned, for sparse token-level distillation of a black-box
teacher (`distill cache from-generated`).

`distill generate --top-logprobs K` keeps, for every token the teacher wrote, its text, its log-prob and the K most
likely alternatives as (text, log-prob) pairs. When the student shares the teacher's tokenizer (a model served with
`distill serve`, or a vLLM teacher of the student's family), those pairs are the teacher's distribution over the
student's vocabulary, truncated to K + 1 entries. This module maps them to token ids and stores them as a
`TokenCache` over the same JSONL file, so `distill train-lm --set data=generated.jsonl --set cache=DIR` trains on
the teacher's distributions (sparse KD with a tail bucket, `losses.py`) where it has them and on the sampled text
(cross-entropy) everywhere.

Alignment. The data file is tokenized as `train-lm` tokenizes it (`lm_data.tokenize_examples`). The text each
completion token of the student's tokenization adds is compared, in order, with the token texts the API returned
(the text a token adds after the previous few, as OpenAI and `distill serve` report it). Positions are used up to
the first disagreement: a tokenizer that differs from the teacher's, a sampled text that the tokenizer splits
otherwise, a stop string that cut a token, or a token holding part of a UTF-8 character (its text is "\ufffd"
whatever its bytes, so equal texts prove nothing there). What is not used is still trained on as text; the summary says how much
of the completions the cache covers.

Alternatives map to ids through the student's vocabulary as text (each id decoded after a fixed context token, or
alone for a completion's first token). A text that several ids decode to (byte fragments, special tokens) or no id
decodes to is dropped, and its probability falls into the tail bucket. The log-probs are the teacher's raw
distribution (temperature 1, as OpenAI and `distill serve` report them), so the cache's temperature is 1.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from distill.data import json_lines, sha256_file
from distill.engine import PIECE_CONTEXT, added_text, decode_text
from distill.errors import DataError, DistillError
from distill.generate.client import TokenLogprobs
from distill.lm_data import LMDataset, read_examples, tokenize_examples
from distill.losses import LOG_FLOOR
from distill.progress import NULL, Reporter
from distill.teachers.token_cache import write_token_cache
from distill.teachers.token_codec import Codec

REPLACEMENT = "\ufffd"  # what a token holding part of a UTF-8 character decodes to: equal texts, maybe other bytes


@dataclass
class ApiCacheSummary:
    rows: int  # rows of the generated file
    rows_with_logprobs: int  # rows that carry top log-probs
    rows_aligned: int  # rows whose every returned token lines up with the student's tokenization
    positions: int  # completion positions stored (teacher distributions)
    completion_positions: int  # completion positions of the data (what train-lm trains on)
    alternatives: int  # alternative tokens the API returned at the stored positions
    alternatives_mapped: int  # of them, mapped to one student id
    top_k: int  # entries per stored position (the API's K plus the sampled token)

    @property
    def coverage(self) -> float:
        return self.positions / max(self.completion_positions, 1)

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "coverage": self.coverage}


class VocabularyText:
    """The text each id of a tokenizer adds: after a context token (`after`), or at the start of a text (`alone`);
    only texts that exactly one id gives are kept."""

    def __init__(self, tokenizer: Any):
        size = len(tokenizer)
        anchor = tokenizer("a", add_special_tokens=False)["input_ids"][:1] or [0]
        head = decode_text(tokenizer, anchor)
        after = [t[len(head) :] for t in _batch_decode(tokenizer, [[*anchor, i] for i in range(size)])]
        alone = _batch_decode(tokenizer, [[i] for i in range(size)])
        self.after, self.alone = _unique(after), _unique(alone)

    def id_of(self, text: str, first: bool) -> int | None:
        return (self.alone if first else self.after).get(text)


def _unique(texts: Sequence[str]) -> dict[str, int]:
    seen: dict[str, int] = {}
    shared: set[str] = set()
    for i, text in enumerate(texts):
        if text in seen:
            shared.add(text)
        seen[text] = i
    return {text: i for text, i in seen.items() if text not in shared and text}


def _batch_decode(tokenizer: Any, rows: Sequence[Sequence[int]]) -> list[str]:
    texts = tokenizer.batch_decode(
        [list(r) for r in rows], skip_special_tokens=True, clean_up_tokenization_spaces=False
    )
    return [str(t) for t in texts]


def token_pieces(tokenizer: Any, ids: Sequence[int]) -> list[str]:
    """The text each of `ids` adds after the ones before it, as servers report it (`sampling.added_text`)."""
    ids = list(ids)
    return [added_text(tokenizer, ids[max(0, j - PIECE_CONTEXT) : j], ids[j]) for j in range(len(ids))]


def cache_from_generated(
    path: Path,
    tokenizer: Any,
    directory: Path,
    *,
    max_length: int = 512,
    shard_tokens: int = 1 << 20,
    reporter: Reporter = NULL,
) -> ApiCacheSummary:
    """Store the top log-probs kept in `path` (rows of `distill generate --top-logprobs K`) as a token cache over
    the same file tokenized by `tokenizer` (the student's), in `directory`. DataError when no row holds top
    log-probs; DistillError when none lines up with the tokenizer (a student with another tokenizer)."""
    path = Path(path)
    examples = read_examples(path, tokenizer)  # the rows as train-lm reads them, in file order
    data = tokenize_examples(tokenizer, examples, max_length)
    returned, models = _returned(path)
    with_top = [r for r in returned if r is not None and r.top is not None]
    if not with_top:
        raise DataError(
            f"no row of {path} holds top log-probs; generate with --top-logprobs K (a server that offers them)"
        )
    top_k = min(1 + max((len(p) for r in with_top for p in r.top or []), default=0), len(tokenizer))
    found = _align(returned, data, tokenizer, top_k, reporter)
    if not found.values:
        raise DistillError(
            f"none of the teacher's tokens in {path} line up with this tokenizer's: the teacher uses another "
            "tokenizer, so its log-probs cannot be used token by token; train on the text alone (no cache)"
        )
    _store(found, data, tokenizer, directory, top_k=top_k, source=path, models=models, shard_tokens=shard_tokens)
    return ApiCacheSummary(
        rows=len(returned),
        rows_with_logprobs=len(with_top),
        rows_aligned=found.rows_aligned,
        positions=len(found.values),
        completion_positions=found.completion_positions,
        alternatives=found.alternatives,
        alternatives_mapped=found.alternatives_mapped,
        top_k=top_k,
    )


def _returned(path: Path) -> tuple[list[TokenLogprobs | None], set[str]]:
    """Each row's top log-probs (None where it kept none) and the models that wrote them."""
    returned: list[TokenLogprobs | None] = []
    models: set[str] = set()
    for where, row in json_lines(path):
        entry = row.get("top_logprobs") if isinstance(row, dict) else None
        try:
            returned.append(None if entry is None else TokenLogprobs.from_json(entry))
        except (KeyError, TypeError, ValueError):
            raise DataError(f"{where}: top_logprobs must hold tokens, logprobs and top lists") from None
        if isinstance(row, dict) and isinstance(row.get("model"), str):
            models.add(row["model"])
    return returned, models


@dataclass
class _Alignment:
    """The teacher's distributions found at the student's positions, row after row, and what was counted."""

    values: list[np.ndarray] = field(default_factory=list)  # each (K,) log-probs
    ids: list[np.ndarray] = field(default_factory=list)  # each (K,) student token ids
    masks: list[np.ndarray] = field(default_factory=list)  # each (T_i,) bool: positions holding a distribution
    rows_aligned: int = 0
    alternatives: int = 0
    alternatives_mapped: int = 0
    completion_positions: int = 0


def _align(
    returned: list[TokenLogprobs | None], data: LMDataset, tokenizer: Any, top_k: int, reporter: Reporter
) -> _Alignment:
    """Every row's returned tokens lined up with the student's tokenization of its completion (module docstring)."""
    vocabulary = VocabularyText(tokenizer)
    eos = getattr(tokenizer, "eos_token_id", None)
    found = _Alignment()
    reporter.stage("teacher tokens to student ids", total=len(returned))
    for i, row in enumerate(returned):
        reporter.advance(1)
        sequence = data.sequences[i].tolist()
        start = int(data.prompt_lengths[i])
        mask = np.zeros(len(sequence), bool)
        found.masks.append(mask)
        found.completion_positions += int(data.scored(i).sum())
        if row is None or row.top is None:
            continue
        completion = sequence[start:]
        if completion and completion[-1] == eos and len(completion) > len(row.tokens):
            completion = completion[:-1]  # the end-of-text token the data adds; APIs return no entry for it
        pieces = token_pieces(tokenizer, completion)
        agree = 0
        while (
            agree < min(len(pieces), len(row.tokens))
            and pieces[agree] == row.tokens[agree]
            and REPLACEMENT not in pieces[agree]
        ):
            agree += 1
        found.rows_aligned += agree == len(row.tokens) == len(pieces)
        for j in range(agree):
            position = start + j - 1  # position t holds the distribution of token t + 1
            if position < 0:
                continue  # no prompt token to predict the first completion token from
            _add_position(found, row, j, completion[j], vocabulary, top_k)
            mask[position] = True
    reporter.end()
    return found


def _add_position(
    found: _Alignment, row: TokenLogprobs, j: int, token: int, vocabulary: VocabularyText, top_k: int
) -> None:
    """The distribution at completion token `j`: the sampled `token`, then the alternatives that map to one id."""
    assert row.top is not None
    chosen = [token]
    logprobs = [row.logprobs[j]]
    for text, logprob in row.top[j]:
        found.alternatives += 1
        mapped = vocabulary.id_of(text, first=j == 0)
        if mapped is None:
            continue
        found.alternatives_mapped += 1
        if mapped not in chosen and len(chosen) < top_k:
            chosen.append(mapped)
            logprobs.append(logprob)
    value, token_ids = _padded(chosen, logprobs, top_k)
    found.values.append(value)
    found.ids.append(token_ids)


def _store(
    found: _Alignment,
    data: LMDataset,
    tokenizer: Any,
    directory: Path,
    *,
    top_k: int,
    source: Path,
    models: set[str],
    shard_tokens: int,
) -> None:
    """The distributions found, encoded and written as a token cache over `data` (temperature 1)."""
    from distill.hf import tokenizer_fingerprint

    codec = Codec.for_sizes(top_k, len(tokenizer))
    top = np.stack(found.values)  # (n, K)
    top_ids = np.stack(found.ids)  # (n, K)
    mass = np.exp(top.astype(np.float64)).sum(axis=1)  # (n,)
    log_tail = np.log(np.clip(1.0 - mass, 1e-30, None))  # (n,) what the kept entries leave
    write_token_cache(
        codec.encode(top, top_ids, log_tail),
        [s.numpy() for s in data.sequences],
        found.masks,
        directory,
        codec=codec,
        temperature=1.0,
        teacher_name="api:" + ",".join(sorted(models) or ["unknown"]),
        teacher_revision=f"generated-{sha256_file(source)[:16]}",
        tokenizer_hash=tokenizer_fingerprint(tokenizer),
        data_id=data.fingerprint(),
        shard_tokens=shard_tokens,
    )


def _padded(chosen: list[int], logprobs: list[float], k: int) -> tuple[np.ndarray, np.ndarray]:
    """(K,) log-probs and (K,) distinct ids: the given entries, then unused ids at LOG_FLOOR (probability ~0)."""
    values = np.full(k, LOG_FLOOR, np.float32)
    token_ids = np.zeros(k, np.int64)
    values[: len(chosen)] = np.maximum(np.array(logprobs[:k], np.float64), LOG_FLOOR)
    token_ids[: len(chosen)] = chosen[:k]
    used, spare = set(chosen), 0
    for slot in range(len(chosen), k):
        while spare in used:
            spare += 1
        token_ids[slot] = spare
        used.add(spare)
    if not math.isfinite(float(values.max())):
        raise DataError("a returned log-prob is not a finite number")
    return values, token_ids
