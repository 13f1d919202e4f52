"""The generation engine behind `distill serve`: batched token sampling for a causal LM, and the batcher that lets
concurrent requests share forward passes.

`Engine.generate` runs one forward pass per generated token for a whole batch of rows with a KV cache. Rows are
left-padded to a common length with an attention mask and explicit position ids, so what a row generates does not
depend on the rows it is batched with (batched greedy equals unbatched greedy, a test). Each row keeps its own
temperature (0 means greedy), top-p, stop strings and `torch.Generator`, so a seeded row is reproducible in any batch.
Log-probs are those of the model's raw distribution (log-softmax of the logits, temperature 1), as OpenAI reports
them, clamped at -9999 so that they stay finite JSON numbers.

A row ends on an end-of-sequence token (finish reason "stop", the token is counted but not shown), on a stop string
(the text is cut before it, "stop") or after `max_tokens` tokens ("length"). A row whose `cancelled` flag is set
(from any thread: its client left) ends at the next step with finish reason "cancelled" and takes no more sampling
or decoding; once every row of a batch has ended, `generate` returns.

`Engine.encode` refuses (`PromptTooLong`) a text of more than `CHARS_PER_TOKEN` characters per token of the context
before tokenizing it: a fast tokenizer holds some 45 to 125 bytes per character of its input (4 MiB prompts took
180 to 510 MB at their peak), and no sensible prompt that long fits the context.

`Batcher` collects submitted rows for up to `wait_ms` after the first arrives, up to `max_batch_size` rows (a request
with more rows is split into batches of that size, so no batch outgrows it), and runs them with `Engine.generate` in
a worker thread, so the event loop stays free.
Cancelling a `Batcher.run` call cancels its rows: a job whose rows are all cancelled before its batch starts is
skipped, and in a running batch they end at the next step while the rows batched with them go on.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

MIN_LOGPROB = -9999.0
PIECE_CONTEXT = 4  # tokens decoded before an alternative token to see the text it adds
CHARS_PER_TOKEN = 64  # characters of a prompt per token of the context, at most (English averages about 4)


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    top_logprobs: int | None = None  # None: no log-probs; k: the chosen token's and the k most likely ones


@dataclass
class TokenLogprob:
    token: str  # the text the token adds: the generated texts' tokens concatenate to the generated text
    logprob: float
    offset: int  # where the token's text starts in the generated text
    top: list[tuple[str, float]]  # the most likely tokens at this step, most likely first


# (new text, log-probs of the tokens it covers, finish reason once the row is done); called from the worker thread
DeltaCallback = Callable[[str, list[TokenLogprob], str | None], None]


@dataclass
class Sequence:
    """One row of a batch: a prompt and its sampling parameters, then (filled in by `Engine.generate`) the result."""

    prompt_ids: list[int]
    params: SamplingParams
    on_delta: DeltaCallback | None = None  # streaming: receives text as soon as no stop string can still remove it
    token_ids: list[int] = field(default_factory=list)  # generated tokens, without the end-of-sequence token
    generated: int = 0  # tokens sampled, the end-of-sequence token included
    text: str = ""
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    emitted: int = 0  # characters of `text` already passed to on_delta
    emitted_logprobs: int = 0
    cancelled: bool = False  # set from any thread when nobody waits for the row any more: it ends at the next step


class PromptTooLong(ValueError):
    """A text of more characters than the model's context can hold, refused before it is tokenized."""

    def __init__(self, chars: int, max_chars: int) -> None:
        super().__init__(f"the text is {chars} characters, over the {max_chars} that are tokenized at most")
        self.chars, self.max_chars = chars, max_chars


def context_length(config: Any, tokenizer: Any) -> int:
    """The longest sequence (prompt + completion) the model can attend to."""
    for name in ("max_position_embeddings", "n_positions", "n_ctx", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(limit, int) and 0 < limit < 10**8:
        return limit
    raise ValueError("cannot tell the model's context length: its config has no max_position_embeddings")


def first_stop(text: str, stops: tuple[str, ...]) -> int | None:
    """Where the earliest stop string starts in `text`, or None."""
    found = [index for index in (text.find(stop) for stop in stops) if index >= 0]
    return min(found) if found else None


def settled_length(text: str, stops: tuple[str, ...]) -> int:
    """How much of `text` is final: not an incomplete character, not a suffix that could start a stop string."""
    end = len(text)
    while end > 0 and text[end - 1] == "\ufffd":  # bytes of a multi-byte character still to come
        end -= 1
    held = 0
    for stop in stops:
        for size in range(min(len(stop) - 1, end), held, -1):
            if text[end - size : end] == stop[:size]:
                held = size
                break
    return end - held


def top_p_filter(probs: Tensor, top_p: Tensor) -> Tensor:
    """Zero the tokens outside each row's nucleus: the most likely tokens whose mass first reaches top_p."""
    sorted_probs, order = probs.sort(dim=-1, descending=True)  # (B, V)
    outside = sorted_probs.cumsum(dim=-1) - sorted_probs > top_p  # (B, V); the most likely token always stays
    return torch.zeros_like(probs).scatter(-1, order, sorted_probs.masked_fill(outside, 0.0))  # (B, V)


def decode_text(tokenizer: Any, ids: list[int]) -> str:
    """Token ids as the text a client sees: special tokens left out, spaces as the tokenizer wrote them."""
    return str(tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False))


def added_text(tokenizer: Any, previous: list[int], token: int) -> str:
    """The text `token` adds after `previous` (a space, a completed character...), judged from the last few: what
    the server reports as a token's text, and what `teachers.api_logprobs` lines the student's tokens up by."""
    context = previous[-PIECE_CONTEXT:]
    return decode_text(tokenizer, [*context, token])[len(decode_text(tokenizer, context)) :]


class Engine:
    """A causal LM and its tokenizer, ready to generate batches of `Sequence`s."""

    def __init__(self, model: Any, tokenizer: Any, device: str = "cpu") -> None:
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.tokenizer = tokenizer
        self.context = context_length(model.config, tokenizer)
        generation = getattr(model, "generation_config", None)
        eos = [
            tokenizer.eos_token_id,
            getattr(model.config, "eos_token_id", None),
            getattr(generation, "eos_token_id", None),
        ]
        self.eos_ids = {
            i for e in eos for i in (e if isinstance(e, list) else [e]) if isinstance(i, int)
        }  # ints or lists
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.pad_id = int(pad) if pad is not None else 0  # padded positions are masked, any id works
        start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        self.start_ids = [int(start)] if start is not None else [self.pad_id]  # the prompt of an empty prompt
        arguments = inspect.signature(model.forward).parameters
        self._cache_argument = "cache" if "cache" in arguments else "past_key_values"  # renamed in transformers 5
        self._keep_argument = next((a for a in ("logits_to_keep", "num_logits_to_keep") if a in arguments), None)

    @property
    def max_chars(self) -> int:
        """The longest text `encode` tokenizes: `CHARS_PER_TOKEN` characters per token of the context."""
        return CHARS_PER_TOKEN * self.context

    def encode(self, text: str, *, special_tokens: bool = True) -> list[int]:
        """The token ids of `text` (the start token for an empty one); `PromptTooLong` for a text over `max_chars`,
        before any tokenizing. Whether the ids fit the context is for the caller to check."""
        if len(text) > self.max_chars:
            raise PromptTooLong(len(text), self.max_chars)
        ids = list(self.tokenizer(text, add_special_tokens=special_tokens)["input_ids"])
        return ids or list(self.start_ids)

    def decode(self, ids: list[int]) -> str:
        return decode_text(self.tokenizer, ids)

    def generate(self, rows: list[Sequence]) -> None:
        """Sample every row to its end; fills each row's result fields and calls its `on_delta` as text settles."""
        if not rows:
            return
        for row in rows:
            if not row.prompt_ids or len(row.prompt_ids) + row.params.max_tokens > self.context:
                raise ValueError(f"a prompt of {len(row.prompt_ids)} tokens cannot take {row.params.max_tokens} more")
        batch, width = len(rows), max(len(row.prompt_ids) for row in rows)
        ids = torch.full((batch, width), self.pad_id, dtype=torch.long)  # (B, T), left-padded
        mask = torch.zeros((batch, width), dtype=torch.long)  # (B, T)
        for i, row in enumerate(rows):
            ids[i, width - len(row.prompt_ids) :] = torch.tensor(row.prompt_ids)
            mask[i, width - len(row.prompt_ids) :] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(dim=-1) - 1).clamp(min=0)  # (B, T); every row starts at position 0
        generators = [torch.Generator(device=self.device) for _ in rows]
        for generator, row in zip(generators, rows):
            if row.params.seed is None:
                generator.seed()  # a fresh random seed
            else:
                generator.manual_seed(row.params.seed)
        with torch.inference_mode():
            logits, cache = self._forward(ids, mask, positions, None)  # (B, V)
            while True:
                for row in rows:
                    if row.cancelled and row.finish_reason is None:
                        row.finish_reason = "cancelled"  # its client left: no more sampling, decoding or deltas
                tokens = self._choose(logits, rows, generators)  # (B,)
                self._advance(rows, logits, tokens)
                if all(row.finish_reason is not None for row in rows):
                    return
                mask = torch.cat([mask, mask.new_ones(batch, 1)], dim=1)  # (B, T + steps)
                positions = (positions[:, -1:] + 1).clamp(max=self.context - 1)  # (B, 1); finished rows stay put
                logits, cache = self._forward(tokens[:, None], mask, positions, cache)

    def _forward(self, ids: Tensor, mask: Tensor, positions: Tensor, cache: Any) -> tuple[Tensor, Any]:
        arguments: dict[str, Any] = {"input_ids": ids, "attention_mask": mask, "position_ids": positions}
        if cache is not None:
            arguments[self._cache_argument] = cache
        elif self._keep_argument is not None:
            arguments[self._keep_argument] = 1  # the prompt's last position is the only one sampled from
        out = self.model(**arguments, use_cache=True)
        return out.logits[:, -1].float(), out[self._cache_argument]  # (B, V)

    @staticmethod
    def _choose(logits: Tensor, rows: list[Sequence], generators: list[torch.Generator]) -> Tensor:
        tokens = logits.argmax(dim=-1)  # (B,); greedy rows and finished rows keep this
        sampled = [i for i, row in enumerate(rows) if row.finish_reason is None and row.params.temperature > 0]
        if not sampled:
            return tokens
        temperature = torch.tensor([rows[i].params.temperature for i in sampled], device=logits.device)  # (S,)
        probs = torch.softmax(logits[sampled] / temperature[:, None], dim=-1)  # (S, V)
        top_p = torch.tensor([[rows[i].params.top_p] for i in sampled], device=logits.device)  # (S, 1)
        if (top_p < 1).any():
            probs = top_p_filter(probs, top_p)
        for row_probs, i in zip(probs, sampled):
            tokens[i] = torch.multinomial(row_probs, 1, generator=generators[i])[0]
        return tokens

    def _advance(self, rows: list[Sequence], logits: Tensor, tokens: Tensor) -> None:
        active = [i for i, row in enumerate(rows) if row.finish_reason is None]
        wanted = [k for k in (rows[i].params.top_logprobs for i in active) if k is not None]
        chosen_logprobs: list[float] = []
        top_logprobs: list[list[float]] = []
        top_ids: list[list[int]] = []
        if wanted:
            logprobs = torch.log_softmax(logits, dim=-1).clamp(min=MIN_LOGPROB)  # (B, V), temperature 1
            chosen_logprobs = logprobs.gather(-1, tokens[:, None])[:, 0].tolist()  # (B,)
            best = logprobs.topk(min(max(wanted), logprobs.shape[-1]), dim=-1)  # (B, K)
            top_logprobs, top_ids = best.values.tolist(), best.indices.tolist()
        token_list = tokens.tolist()
        for i in active:
            row, token = rows[i], int(token_list[i])
            row.generated += 1
            if token in self.eos_ids:
                row.finish_reason = "stop"
                self._emit(row)
                continue
            offset = len(row.text)
            row.token_ids.append(token)
            row.text = self.decode(row.token_ids)
            k = row.params.top_logprobs
            if k is not None:
                top = [(self._piece(row.token_ids[:-1], t), p) for t, p in zip(top_ids[i][:k], top_logprobs[i][:k])]
                row.logprobs.append(TokenLogprob(row.text[offset:], chosen_logprobs[i], offset, top))
            cut = first_stop(row.text, row.params.stop)
            if cut is not None:
                row.text, row.finish_reason = row.text[:cut], "stop"
                row.logprobs = [entry for entry in row.logprobs if entry.offset < cut]
            elif row.generated >= row.params.max_tokens:
                row.finish_reason = "length"
            self._emit(row)

    def _piece(self, previous: list[int], token: int) -> str:
        return added_text(self.tokenizer, previous, token)

    @staticmethod
    def _emit(row: Sequence) -> None:
        if row.on_delta is None:
            return
        done = row.finish_reason is not None
        end = len(row.text) if done else settled_length(row.text, row.params.stop)
        logprobs = [entry for entry in row.logprobs[row.emitted_logprobs :] if done or entry.offset < end]
        if end <= row.emitted and not done:
            return
        delta = row.text[row.emitted : end] if end > row.emitted else ""
        row.emitted, row.emitted_logprobs = max(end, row.emitted), row.emitted_logprobs + len(logprobs)
        row.on_delta(delta, logprobs, row.finish_reason)


@dataclass
class _Job:
    rows: list[Sequence]
    done: asyncio.Future[None]


class Batcher:
    """Runs the rows of concurrent requests together, up to `max_batch_size` rows per batch."""

    def __init__(self, engine: Engine, max_batch_size: int = 16, wait_ms: float = 5.0) -> None:
        if max_batch_size < 1 or not 0 <= wait_ms < float("inf"):
            raise ValueError("max_batch_size must be at least 1 and wait_ms a finite number at least 0")
        self.engine, self.max_batch_size, self.wait_ms = engine, max_batch_size, wait_ms
        self._queue: asyncio.Queue[_Job] | None = None
        self._task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def run(self, rows: list[Sequence]) -> None:
        """Generate `rows` (in place), batched with whatever other rows are waiting. Cancelling this call marks the
        rows cancelled: they are skipped, or end at their batch's next step; the other rows of the batch go on."""
        loop = asyncio.get_running_loop()
        if self._queue is None or self._task is None or self._task.done() or self._loop is not loop:
            self._loop, self._queue = loop, asyncio.Queue()
            self._task = loop.create_task(self._work(self._queue))
        jobs = [
            _Job(rows[i : i + self.max_batch_size], loop.create_future())
            for i in range(0, len(rows), self.max_batch_size)
        ]
        for job in jobs:
            self._queue.put_nowait(job)
        try:
            await asyncio.shield(asyncio.gather(*(job.done for job in jobs)))  # a cancelled request does not cancel...
        except asyncio.CancelledError:
            for row in rows:
                row.cancelled = True  # ...the batch it is in, but its own rows stop
            raise

    async def close(self) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _work(self, queue: asyncio.Queue[_Job]) -> None:
        loop, waiting = asyncio.get_running_loop(), None
        while True:
            batch = [waiting or await queue.get()]
            waiting, size = None, len(batch[0].rows)
            deadline = loop.time() + self.wait_ms / 1000
            while size < self.max_batch_size:
                try:
                    job = queue.get_nowait()
                except asyncio.QueueEmpty:
                    left = deadline - loop.time()
                    if left <= 0:
                        break
                    await asyncio.sleep(min(left, 0.001))
                    continue
                if size + len(job.rows) > self.max_batch_size:
                    waiting = job
                    break
                batch.append(job)
                size += len(job.rows)
            batch = [job for job in batch if not _abandoned(job)]
            if not batch:
                continue
            try:
                await asyncio.to_thread(self.engine.generate, [row for job in batch for row in job.rows])
            except Exception as error:
                for job in batch:
                    if not job.done.done():
                        job.done.set_exception(error)
            else:
                for job in batch:
                    if not job.done.done():
                        job.done.set_result(None)


def _abandoned(job: _Job) -> bool:
    """Whether every row of `job` was cancelled before its batch started; such a job is done without running."""
    if not all(row.cancelled for row in job.rows):
        return False
    for row in job.rows:
        row.finish_reason = row.finish_reason or "cancelled"
    if not job.done.done():
        job.done.set_result(None)
    return True
