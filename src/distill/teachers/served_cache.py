"""A teacher's top-k token cache built through its server, by teacher-forced scoring over an OpenAI-compatible API
(vLLM, SGLang, `distill serve`), so the teacher never enters this machine's memory (`distill cache build
--base-url URL --model NAME`). The cache is the one `distill cache build --teacher` writes (`token_cache`).

**Requests.** Each row is tokenized with the student's tokenizer exactly as `cache build` and `train-lm` tokenize
it (`lm_data.read_examples`, `tokenize_examples`), and its token ids are sent as the prompt of one `/completions`
request for the log-probs of the prompt's own tokens, in the first format the server answers (vLLM's
`prompt_logprobs`, else OpenAI's legacy `echo` with `logprobs`; `served_scores` describes both), probed once, on
the first row asked. A server that answers neither (refusing the fields with a 4xx, or answering without them) is
refused at once: "the server at URL cannot score prompts (...)", with what each format got.

**What is kept.** Entry j is the teacher's distribution of token j given the tokens before it: the cache's position
t = j - 1. The cache keeps the positions the local build keeps (those predicting a completion token), and at each
the K most likely ids, their log-probs and the tail bucket (1 - their mass), where K = min(k asked, the entries
the server returned at a position of the first row asked, the vocabulary): an API gives at most 20 or so where the
local build can keep hundreds. With prompt_logprobs the ids are the server's; with echo the alternatives come back
as texts and map to ids through the student's vocabulary as `api_logprobs` maps them (a text that no single id
gives falls into the tail: special tokens, which decode to no text, so prefer prompt_logprobs), the sent token's id
and log-prob being known. Servers report log-probs at temperature 1, so the cache's temperature is 1.

**Same vocabulary.** The server is sent ids and tokenizes nothing, but its vocabulary must be the student's: the
text it reports for each sent token (`decoded_token`, or the echoed token) must be the text that id adds in the
student's tokenizer after the tokens before it (`api_logprobs.token_pieces`), or that id decoded alone (servers
report either), spaces at the ends aside. A text that is empty or holds part of a UTF-8 character ("\\ufffd")
proves nothing and is passed over; any other difference stops the build with the mismatch error.
OpenAI-compatible servers do not publish a hash of their tokenizer; the manifest records the student's
(`tokenizer_hash`, what `train-lm` checks) and how many of the server's token texts were compared.

**Resume, concurrency, cost.** The records are written by `token_cache.build_scored_cache` (the local build's
shards, index, manifest): a killed build resumes after its finished shards and asks only for the rows after them;
a finished cache is reused without a request. Up to the client's `concurrency` requests are in flight (retried with
backoff by `TeacherClient`) and the answers are taken in data order. Tokens and cost are the server's `usage`
priced as `distill generate` prices them; the manifest's `served` section records the server, the format, the k
asked and kept, and the usage of the run that finished the cache.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine, Generator, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np

from distill.config import ServedCacheOptions
from distill.errors import CacheError, DistillError
from distill.generate.client import Prices, TeacherClient, TeacherClientError, Usage
from distill.lm_data import read_examples, tokenize_examples
from distill.losses import LOG_FLOOR
from distill.progress import NULL, Reporter
from distill.teachers.api_logprobs import VocabularyText
from distill.teachers.cache_files import MANIFEST, PARTIAL, read_json
from distill.teachers.served_scores import (
    SCORING,
    Pairs,
    Unscorable,
    decode_batch,
    pieces,
    read_answer,
    request,
    same_text,
)
from distill.teachers.token_cache import build_scored_cache
from distill.teachers.token_codec import Codec

REVISION = "served"  # an API does not say which weights answer
SHARD_TOKENS = 1 << 16  # positions per shard: at most what a killed build asks for again
ROWS_PER_CALL = 8  # rows turned into records at once
API_TOP_K = 20  # the most log-probs OpenAI's API and vLLM (by default) give per token


@dataclass
class ServedCacheSummary:
    rows: int  # rows of the data
    rows_asked: int  # rows asked of the server by this run (the others were in finished shards)
    positions: int  # positions the cache holds (the completions' tokens)
    top_k: int  # entries per position: min(k asked, what the server returned, the vocabulary)
    top_k_requested: int
    scoring: str | None  # prompt_logprobs or echo; None when nothing was asked
    tokens_checked: int  # server token texts compared with the student's tokenizer (all agreed)
    requests: int
    retries: int
    prompt_tokens: int
    completion_tokens: int
    cost: float

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class _Row:
    ids: np.ndarray  # (m, W) per scored position, the ids the server gave (-1 past their end)
    values: np.ndarray  # (m, W) their log-probs (-inf past their end)
    returned: int  # the most top entries the server gave at one position


def build_served_cache_with(
    options: ServedCacheOptions,
    base_url: str,
    model: str,
    api_key: str | None,
    data: Path,
    tokenizer: Any,
    directory: Path,
    reporter: Reporter = NULL,
) -> ServedCacheSummary:
    """`build_served_cache` with the settings of `distill cache build --base-url` (its options, or a service job's)."""
    client = TeacherClient(
        base_url,
        model,
        api_key=api_key,
        concurrency=options.concurrency,
        timeout=options.timeout,
        max_retries=options.max_retries,
        prices=Prices(input_per_million=options.price_input, output_per_million=options.price_output),
    )
    return build_served_cache(
        client, data, tokenizer, directory, top_k=options.top_k, max_length=options.max_length, reporter=reporter
    )


def build_served_cache(
    client: TeacherClient,
    data: Path,
    tokenizer: Any,
    directory: Path,
    *,
    top_k: int,
    max_length: int = 512,
    scoring: Sequence[str] = SCORING,
    shard_tokens: int = SHARD_TOKENS,
    reporter: Reporter = NULL,
) -> ServedCacheSummary:
    """Score the data `data` (tokenized by `tokenizer`, the student's) with the teacher `client` serves and store
    the top-`top_k` log-probs of the completions' tokens as a token cache in `directory` (module docstring).
    DistillError when the server cannot score prompts or its vocabulary is not the tokenizer's; CacheError when
    `directory` holds another cache; TeacherClientError when a request fails for good (run again to resume).
    `scoring` names the formats to try, in order (`SCORING` by default)."""
    from distill.hf import tokenizer_fingerprint

    if top_k < 1 or not scoring or set(scoring) - set(SCORING):
        raise ValueError(f"top_k must be at least 1 (not {top_k}) and scoring some of {SCORING} (not {scoring})")
    dataset = tokenize_examples(tokenizer, read_examples(Path(data), tokenizer), max_length)
    sequences = [s.tolist() for s in dataset.sequences]
    masks = [dataset.scored(i).numpy() for i in range(len(dataset))]
    names = {"teacher_name": client.model, "teacher_revision": REVISION, "data_id": dataset.fingerprint(),
             "tokenizer_hash": tokenizer_fingerprint(tokenizer)}  # fmt: skip
    before = client.usage.snapshot()
    with _event_loop(client) as loop:
        scorer = _Scorer(client, tokenizer, sequences, masks, top_k, loop, tuple(scoring))
        try:
            kept = _known_top_k(Path(directory), names, top_k) or min(scorer.probe(0), top_k)
            codec = Codec.for_sizes(min(kept, len(tokenizer)), len(tokenizer))
            manifest = build_scored_cache(
                scorer.records(codec), dataset.sequences, directory, scored=masks, codec=codec, temperature=1.0,
                identity={"top_k_requested": top_k}, notes=lambda: scorer.notes(codec, before),
                batch_size=ROWS_PER_CALL, shard_tokens=shard_tokens, reporter=reporter, **names,
            )  # fmt: skip
        finally:
            scorer.close()
    usage = client.usage.since(before)
    return ServedCacheSummary(
        rows=len(sequences), rows_asked=scorer.asked, positions=int(manifest["positions"]),
        top_k=int(manifest["top_k"]), top_k_requested=top_k, scoring=scorer.mode, tokens_checked=scorer.checked,
        requests=usage.requests, retries=usage.retries, prompt_tokens=usage.prompt_tokens,
        completion_tokens=usage.completion_tokens, cost=usage.cost,
    )  # fmt: skip


def _known_top_k(directory: Path, names: Mapping[str, str], top_k: int) -> int | None:
    """The K of a finished or unfinished build of the same cache in `directory` (a resume keeps it), else None."""
    for name in (MANIFEST, PARTIAL):
        if (directory / name).exists():
            found = read_json(directory / name)
            same = all(found.get(key) == value for key, value in names.items())
            if same and found.get("top_k_requested") == top_k and isinstance(found.get("top_k"), int):
                return int(found["top_k"])
    return None


@contextmanager
def _event_loop(client: TeacherClient) -> Iterator[asyncio.AbstractEventLoop]:
    """An event loop of this build's own, run a step at a time by the build; the client's connections closed after."""
    loop = asyncio.new_event_loop()
    try:
        yield loop
    finally:
        try:
            loop.run_until_complete(client.aclose())
        finally:
            loop.close()


def _in_order(
    loop: asyncio.AbstractEventLoop,
    ask: Callable[[int], Coroutine[Any, Any, Any]],
    rows: Sequence[int],
    block: int,
    length: Callable[[int], int],
) -> Generator[tuple[int, Any], None, None]:
    """(row, answer) for `rows` in order. They are asked a block of `block` rows at a time, the next block while
    this one is read, each block's rows shortest first: requests that reach the server together are of about one
    length, so the batches it makes of them pad little (as the local build scores rows in length order). What is
    still asked when the iterator is closed or fails is cancelled."""

    def asked(part: Sequence[int]) -> dict[int, asyncio.Task[Any]]:
        return {row: loop.create_task(ask(row)) for row in sorted(part, key=length)}

    blocks = [rows[start : start + block] for start in range(0, len(rows), block)]
    pending = asked(blocks[0]) if blocks else {}
    try:
        for index, part in enumerate(blocks):
            if index + 1 < len(blocks):
                pending |= asked(blocks[index + 1])  # the next block is asked while this one is read
            for row in part:
                yield row, loop.run_until_complete(pending.pop(row))
    finally:
        for task in pending.values():
            task.cancel()
        if pending:
            loop.run_until_complete(asyncio.gather(*pending.values(), return_exceptions=True))


class _Scorer:
    """Asks the server for the rows' scores, checks its tokens against the student's tokenizer, and encodes the
    kept entries as cache records."""

    def __init__(
        self,
        client: TeacherClient,
        tokenizer: Any,
        sequences: list[list[int]],
        masks: list[np.ndarray],
        top_k: int,
        loop: asyncio.AbstractEventLoop,
        scoring: tuple[str, ...],
    ) -> None:
        self.client, self.tokenizer, self.sequences, self.masks = client, tokenizer, sequences, masks
        self.top_k, self.loop, self.scoring = top_k, loop, scoring
        self.mode: str | None = None
        self.answers: dict[int, _Row] = {}  # rows answered before their turn (the probe)
        self.vocabulary: VocabularyText | None = None
        self.spares: list[int] | None = None
        self.alone: dict[int, str] = {}
        self.stream: Generator[tuple[int, _Row], None, None] | None = None
        self.asked = self.checked = 0

    def probe(self, row: int) -> int:
        """Find the format the server answers with `row` (kept for its turn); the most entries it gave at one
        position."""
        self.mode, answer = self.loop.run_until_complete(self._detect(row))
        self.answers[row] = answer
        return max(answer.returned, 1)

    async def _detect(self, row: int) -> tuple[str, _Row]:
        reasons = []
        for mode in self.scoring:
            try:
                return mode, await self._ask(row, mode)
            except TeacherClientError as error:
                if error.retryable:
                    raise  # the server is down or failing: not a question of what it can do
                reasons.append(f"{mode}: {str(error).partition(' refused the request with ')[2] or error}")
            except Unscorable as missing:
                reasons.append(f"{mode}: {missing}")
        fewer = f"; many servers give at most {API_TOP_K} log-probs: ask for fewer" if self.top_k > API_TOP_K else ""
        raise DistillError(
            f"the server at {self.client.base_url} cannot score prompts ({'; '.join(reasons)}); a teacher-forced "
            f"cache needs /completions with vLLM's prompt_logprobs, or echo with logprobs and max_tokens 0{fewer}"
        )

    async def _ask(self, row: int, mode: str) -> _Row:
        ids = self.sequences[row]
        answer = await self.client.complete_raw(request(mode, ids, self.top_k))
        wanted = (np.flatnonzero(self.masks[row]) + 1).tolist()  # entries j = t + 1 of the scored positions t
        vocabulary = self._vocabulary() if mode == "echo" else None
        texts, candidates, returned = read_answer(mode, answer.choice or {}, ids, wanted, vocabulary)
        self.checked += self._check(row, texts)
        self.asked += 1
        return _Row(*_padded(candidates), returned)

    async def _answer(self, row: int) -> _Row:
        """A row's scores in the format found by the probe."""
        if row in self.answers:
            return self.answers.pop(row)
        assert self.mode is not None
        try:
            return await self._ask(row, self.mode)
        except Unscorable as missing:
            raise DistillError(
                f"the server at {self.client.base_url} answered row {row} without its {self.mode} ({missing}), "
                "though it answered them before; is it the same server?"
            ) from None

    def _spares(self, vocab_size: int) -> Sequence[int]:
        """Ids to fill a position the server gave fewer than K entries for: with echo, first those the vocabulary
        can name (the server would have named them had they been in its top), then the others."""
        if self.mode != "echo":
            return range(vocab_size)
        if self.spares is None:
            named = sorted(self._vocabulary().after.values())
            self.spares = [*named, *sorted(set(range(vocab_size)) - set(named))]
        return self.spares

    def _vocabulary(self) -> VocabularyText:
        if self.vocabulary is None:
            self.vocabulary = VocabularyText(self.tokenizer)
        return self.vocabulary

    def _check(self, row: int, texts: Sequence[str]) -> int:
        """The number of token texts compared with the student's; DistillError at the first that differs."""
        ids = self.sequences[row]
        ours = pieces(self.tokenizer, ids)[1:]
        for j, (theirs, mine) in enumerate(zip(texts, ours), start=1):
            if same_text(theirs, mine) or same_text(theirs, self._alone(ids[j])):
                continue
            raise DistillError(
                f"the server at {self.client.base_url} does not tokenize like the student's tokenizer: row {row}, "
                f"token {j} (id {ids[j]}) is {theirs!r} there and {mine!r} here, so its log-probs cannot be "
                "compared token by token; give the student the teacher's tokenizer, or distill through generated "
                "text (distill generate)"
            )
        return len(texts)

    def _alone(self, token: int) -> str:
        """A token decoded on its own, special tokens included: what some servers report as its text (vLLM's V1)."""
        if token not in self.alone:
            self.alone[token] = decode_batch(self.tokenizer, [[token]], skip_special_tokens=False)[0]
        return self.alone[token]

    def records(self, codec: Codec) -> Callable[[slice], np.ndarray]:
        """`build_scored_cache`'s `score`: the records of rows `rows`, asked for in order from its first call on."""

        def score(rows: slice) -> np.ndarray:
            if self.stream is None:
                if self.mode is None:
                    self.probe(rows.start)
                todo = [r for r in range(rows.start, len(self.sequences)) if self.masks[r].any()]
                length = lambda row: len(self.sequences[row])  # noqa: E731
                self.stream = _in_order(self.loop, self._answer, todo, 2 * self.client.concurrency, length)
            answers: list[_Row] = []
            for row in range(rows.start, rows.stop):
                if self.masks[row].any():
                    answered, answer = next(self.stream)
                    assert answered == row, (answered, row)
                    answers.append(answer)
            ids, values = _stacked(answers)  # (n, W), (n, W)
            return _encode(ids, values, codec, self._spares(codec.vocab_size))

        return score

    def notes(self, codec: Codec, before: Usage) -> dict[str, Any]:
        usage = self.client.usage.since(before)
        return {
            "served": {
                "base_url": self.client.base_url,
                "model": self.client.model,
                "scoring": self.mode,
                "top_k_requested": self.top_k,
                "top_k": codec.top_k,
                "top_k_is": "min(k asked, the entries the server returned, the vocabulary)",
                "temperature": "1 (the server's log-probs)",
                "tokenizer_check": "the server's text of every sent token equals the student tokenizer's",
                "tokens_checked": self.checked,
                "usage": {key: value for key, value in asdict(usage).items() if key != "missing_usage"},
            }
        }

    def close(self) -> None:
        if self.stream is not None:
            self.stream.close()


def _padded(candidates: list[Pairs]) -> tuple[np.ndarray, np.ndarray]:
    """Ids (m, W) and log-probs (m, W) of each position's candidates, padded with -1 and -inf to the longest."""
    width = max((len(found) for found, _ in candidates), default=0)
    ids = np.full((len(candidates), width), -1, np.int64)  # (m, W)
    values = np.full((len(candidates), width), -np.inf)  # (m, W)
    for p, (found, logprobs) in enumerate(candidates):
        ids[p, : len(found)] = found
        values[p, : len(logprobs)] = logprobs
    return ids, values


def _stacked(answers: list[_Row]) -> tuple[np.ndarray, np.ndarray]:
    """The rows' ids (n, W) and log-probs (n, W), one after another, padded to the widest."""
    width = max((a.ids.shape[1] for a in answers), default=0)
    ids = [np.pad(a.ids, ((0, 0), (0, width - a.ids.shape[1])), constant_values=-1) for a in answers]
    values = [np.pad(a.values, ((0, 0), (0, width - a.values.shape[1])), constant_values=-np.inf) for a in answers]
    return np.concatenate([np.zeros((0, width), np.int64), *ids]), np.concatenate([np.zeros((0, width)), *values])


def _encode(ids: np.ndarray, values: np.ndarray, codec: Codec, spares: Sequence[int]) -> np.ndarray:
    """Records (n,) of the K most likely of each position's candidates, ids (n, W) and log-probs (n, W), and the tail
    they leave; ids outside the vocabulary count in the tail. A position with fewer than K candidates is filled at
    LOG_FLOOR (probability ~0) with the first unused of `spares`: ids the server's answer shows to be outside its
    top (an id it could have named but did not), so that no id whose mass went to the tail is said to have none."""
    if np.isnan(values).any() or np.isposinf(values).any():
        raise CacheError("the server returned a log-prob that is not a finite number")
    k = codec.top_k
    values = np.where((ids >= 0) & (ids < codec.vocab_size), values, -np.inf)  # (n, W)
    if values.shape[1] < k:
        values = np.pad(values, ((0, 0), (0, k - values.shape[1])), constant_values=-np.inf)  # (n, K)
        ids = np.pad(ids, ((0, 0), (0, k - ids.shape[1])), constant_values=-1)  # (n, K)
    order = np.argsort(-values, axis=1, kind="stable")[:, :k]  # (n, K) most likely first
    top = np.take_along_axis(values, order, axis=1)  # (n, K)
    top_ids = np.take_along_axis(ids, order, axis=1)  # (n, K)
    for p in np.flatnonzero(np.isneginf(top[:, -1])):  # positions short of K candidates
        given = int(np.isfinite(top[p]).sum())
        used = set(top_ids[p, :given].tolist())
        top_ids[p, given:] = list(islice((i for i in spares if i not in used), k - given))
    top = np.maximum(top, LOG_FLOOR)  # (n, K)
    mass = np.exp(top).sum(axis=1)  # (n,)
    log_tail = np.log(np.clip(1.0 - mass, 1e-30, None))  # (n,) what the kept entries leave
    return codec.encode(top, top_ids, log_tail)
