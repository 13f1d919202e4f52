"""The generation engine behind `distill serve`: batched prompt scoring and token sampling for a causal LM
(`distill.batcher` lets concurrent requests share its forward passes).

`Engine.generate` runs one forward pass over a whole batch of prompts, then one per generated token, with a KV
cache. Rows are left-padded to a common length with an attention mask and explicit position ids, so what a row
generates does not depend on the rows it is batched with (batched greedy equals unbatched greedy, a test). Each row
keeps its own temperature (0 means greedy), top-p, frequency and presence penalties (OpenAI's, on the tokens it has
generated), stop strings and `torch.Generator`, so a seeded row is reproducible in any batch. Log-probs are those
of the model's raw distribution (log-softmax of the logits, temperature 1, before any penalty), as OpenAI reports
them, clamped at -9999 so that they stay finite JSON numbers.

A row whose params ask for `prompt_logprobs` gets its prompt scored in the first pass (`distill.scoring`: the log-prob
of every prompt token after the ones before it, with the top k), whether or not it generates; a row with
`max_tokens` 0 generates nothing and ends with finish reason "length" after that one pass.

A row ends on an end-of-sequence token (finish reason "stop"; the token is counted, not shown in the text, and its
log-prob entry, when log-probs are kept, has empty text and `end` set), on a stop string (the text is cut before
it, "stop") or after `max_tokens` tokens ("length"). A row whose `cancelled` flag is set (from any thread: its
client left) ends at the next step with finish reason "cancelled" and takes no more sampling or decoding; once
every row of a batch has ended, `generate` returns.

`Engine.encode` refuses (`PromptTooLong`) a text of more than `CHARS_PER_TOKEN` characters per token of the context
before tokenizing it: a fast tokenizer holds some 45 to 125 bytes per character of its input (4 MiB prompts took
180 to 510 MB at their peak), and no sensible prompt that long fits the context.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from distill.scoring import CHUNK_ELEMENTS, MIN_LOGPROB, PromptScores, head_problem, score_prompts

PIECE_CONTEXT = 4  # tokens decoded before an alternative token to see the text it adds
CHARS_PER_TOKEN = 64  # characters of a prompt per token of the context, at most (English averages about 4)


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int  # 0: nothing is generated (the prompt is only scored, when prompt_logprobs asks)
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    top_logprobs: int | None = None  # None: no log-probs; k: the chosen token's and the k most likely ones
    frequency_penalty: float = 0.0  # OpenAI's, -2 to 2 (see _Penalties)
    presence_penalty: float = 0.0
    prompt_logprobs: int | None = None  # None: the prompt is not scored; k: its tokens' log-probs and the top k
    prompt_ranks: bool = False  # with prompt_logprobs: also each prompt token's rank in its distribution


@dataclass
class TokenLogprob:
    token: str  # the text the token adds: the generated texts' tokens concatenate to the generated text
    logprob: float
    offset: int  # where the token's text starts in the generated text
    top: list[tuple[str, float]]  # the most likely tokens at this step, most likely first
    end: bool = False  # the end-of-sequence token: its text is empty, and it ends the row


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
    prompt_scores: PromptScores | None = None  # the prompt's own log-probs, when params.prompt_logprobs asks


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
    """A causal LM and its tokenizer, ready to score and generate batches of `Sequence`s."""

    def __init__(self, model: Any, tokenizer: Any, device: str = "cpu") -> None:
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.tokenizer = tokenizer
        self._token_texts: dict[int, str] = {}  # token_text's memory
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
        self.vocab_size = min(len(tokenizer), int(model.get_input_embeddings().num_embeddings))  # ids a prompt holds
        arguments = inspect.signature(model.forward).parameters
        self._cache_argument = "cache" if "cache" in arguments else "past_key_values"  # renamed in transformers 5
        self._keep_argument = next((a for a in ("logits_to_keep", "num_logits_to_keep") if a in arguments), None)
        self.scoring_problem = head_problem(self.model, self.start_ids * 2, self.device)  # None: prompts score
        self.score_chunk = CHUNK_ELEMENTS  # logits computed at once while scoring a prompt

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

    def token_text(self, token: int) -> str:
        """One token id decoded alone (special tokens kept), remembered: at most one entry per token of the
        vocabulary."""
        text = self._token_texts.get(token)
        if text is None:
            text = self._token_texts[token] = str(self.tokenizer.decode([token]))
        return text

    def decode(self, ids: list[int]) -> str:
        return decode_text(self.tokenizer, ids)

    def generate(self, rows: list[Sequence]) -> None:
        """Score and sample every row to its end: fills each row's result fields (`prompt_scores` when its params
        ask for them) and calls its `on_delta` as text settles."""
        for row in rows:
            self._check(row)
            if row.params.max_tokens == 0 and row.params.prompt_logprobs is None:
                self._finish(row, "length")  # nothing to compute
        rows = [row for row in rows if row.finish_reason is None]
        if not rows:
            return
        ids, mask, positions = self._left_padded(rows)
        generators = _generators(rows, self.device)
        with torch.inference_mode():
            logits, cache = self._prefill(rows, ids, mask, positions)  # (B, V)
            for row in rows:
                if row.params.max_tokens == 0:
                    self._finish(row, "length")  # scored, and nothing to generate
            penalties = _Penalties.of(rows, logits)
            while any(row.finish_reason is None for row in rows):
                for row in rows:
                    if row.cancelled and row.finish_reason is None:
                        row.finish_reason = "cancelled"  # its client left: no more sampling, decoding or deltas
                chosen = logits if penalties is None else penalties.applied(logits)  # (B, V)
                tokens = self._choose(chosen, rows, generators)  # (B,)
                if penalties is not None:
                    penalties.count(tokens, rows)
                self._advance(rows, logits, tokens)
                if all(row.finish_reason is not None for row in rows):
                    return
                mask = torch.cat([mask, mask.new_ones(len(rows), 1)], dim=1)  # (B, T + steps)
                positions = (positions[:, -1:] + 1).clamp(max=self.context - 1)  # (B, 1); finished rows stay put
                logits, cache = self._forward(tokens[:, None], mask, positions, cache)

    def _check(self, row: Sequence) -> None:
        tokens, wanted = len(row.prompt_ids), row.params.max_tokens
        if not row.prompt_ids or wanted < 0 or tokens + wanted > self.context:
            raise ValueError(f"a prompt of {tokens} tokens cannot take {wanted} more")
        if row.params.prompt_logprobs is not None and self.scoring_problem is not None:
            raise ValueError(f"this model's prompts cannot be scored: {self.scoring_problem}")

    def _left_padded(self, rows: list[Sequence]) -> tuple[Tensor, Tensor, Tensor]:
        """The prompts left-padded to one length: token ids, attention mask and position ids, each (B, T)."""
        batch, width = len(rows), max(len(row.prompt_ids) for row in rows)
        ids = torch.full((batch, width), self.pad_id, dtype=torch.long)  # (B, T)
        mask = torch.zeros((batch, width), dtype=torch.long)  # (B, T)
        for i, row in enumerate(rows):
            ids[i, width - len(row.prompt_ids) :] = torch.tensor(row.prompt_ids)
            mask[i, width - len(row.prompt_ids) :] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(dim=-1) - 1).clamp(min=0)  # (B, T); every row starts at position 0
        return ids, mask, positions

    def _prefill(self, rows: list[Sequence], ids: Tensor, mask: Tensor, positions: Tensor) -> tuple[Tensor, Any]:
        """The pass over the prompts: each row's next-token logits (B, V) and the KV cache. The rows that ask for
        prompt scores get them from this same pass (the model's body, then its head a chunk at a time)."""
        scored = [i for i, row in enumerate(rows) if row.params.prompt_logprobs is not None]
        if not scored:
            return self._forward(ids, mask, positions, None)
        generating = any(row.params.max_tokens > 0 for row in rows)
        body, head = self.model.base_model, self.model.get_output_embeddings()
        out = body(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=generating)
        hidden = out.last_hidden_state  # (B, T, H)
        for ranked in (False, True):  # ranks cost a pass over the vocabulary: only for the rows that ask
            group = [i for i in scored if rows[i].params.prompt_ranks == ranked]
            if not group:
                continue
            tops = [rows[i].params.prompt_logprobs or 0 for i in group]
            found = score_prompts(hidden[group], ids[group], mask[group], head, tops, ranked, self.score_chunk)
            for i, scores in zip(group, found):
                rows[i].prompt_scores = scores
        return head(hidden[:, -1]).float(), out.get(self._cache_argument)  # (B, V)

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
            end, offset, previous = token in self.eos_ids, len(row.text), row.token_ids[-PIECE_CONTEXT:]
            if not end:
                row.token_ids.append(token)
                row.text = self.decode(row.token_ids)
            k = row.params.top_logprobs
            if k is not None:  # the end-of-sequence token too: its text is empty
                top = [(self._piece(previous, t), p) for t, p in zip(top_ids[i][:k], top_logprobs[i][:k])]
                row.logprobs.append(TokenLogprob(row.text[offset:], chosen_logprobs[i], offset, top, end))
            cut = None if end else first_stop(row.text, row.params.stop)
            if end:
                row.finish_reason = "stop"
            elif cut is not None:
                row.text, row.finish_reason = row.text[:cut], "stop"
                row.logprobs = [entry for entry in row.logprobs if entry.offset < cut]
            elif row.generated >= row.params.max_tokens:
                row.finish_reason = "length"
            self._emit(row)

    def _piece(self, previous: list[int], token: int) -> str:
        return added_text(self.tokenizer, previous, token)

    def _finish(self, row: Sequence, reason: str) -> None:
        row.finish_reason = reason
        self._emit(row)

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


def _generators(rows: list[Sequence], device: torch.device) -> list[torch.Generator]:
    """One random generator per row: seeded with the row's seed, else freshly random."""
    generators = [torch.Generator(device=device) for _ in rows]
    for generator, row in zip(generators, rows):
        if row.params.seed is None:
            generator.seed()
        else:
            generator.manual_seed(row.params.seed)
    return generators


class _Penalties:
    """OpenAI's frequency and presence penalties on each row's logits before it samples (greedy rows too):
    `logits[j] -= count[j] * frequency_penalty + (count[j] > 0) * presence_penalty`, where count[j] is how often the
    row has generated token j so far. The log-probs reported stay those of the model."""

    def __init__(self, rows: list[Sequence], logits: Tensor) -> None:
        self.frequency = torch.tensor([[row.params.frequency_penalty] for row in rows], device=logits.device)  # (B, 1)
        self.presence = torch.tensor([[row.params.presence_penalty] for row in rows], device=logits.device)  # (B, 1)
        self.counts = torch.zeros_like(logits)  # (B, V)

    @classmethod
    def of(cls, rows: list[Sequence], logits: Tensor) -> _Penalties | None:
        """The penalties of `rows`, or None when no row has any."""
        if all(row.params.frequency_penalty == 0 and row.params.presence_penalty == 0 for row in rows):
            return None
        return cls(rows, logits)

    def applied(self, logits: Tensor) -> Tensor:
        return logits - self.counts * self.frequency - (self.counts > 0).float() * self.presence  # (B, V)

    def count(self, tokens: Tensor, rows: list[Sequence]) -> None:
        active = torch.tensor([row.finish_reason is None for row in rows], device=tokens.device)  # (B,)
        self.counts[torch.arange(len(rows), device=tokens.device), tokens] += active.float()
