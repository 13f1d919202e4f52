"""Response bodies in OpenAI's shapes (and vLLM's `prompt_logprobs`), made from the engine's finished rows.

Chat log-probs: `{"content": [{"token", "logprob", "bytes", "top_logprobs": [...]}]}`, one entry per token of the
message (the end-of-sequence token has none). Legacy completions log-probs: `tokens`, `token_logprobs`,
`top_logprobs` (`{text: log-prob}` of the top k tokens) and `text_offset` (counted from the start of the prompt); a
generation that ends on the end-of-sequence token ends its lists with that token (empty text), as vLLM's do. With
`echo`, the choice's text starts with the prompt, and its log-probs start with the prompt's tokens: each token's
text (what it adds to the tokens before it), its log-prob (`null` for the first), and its top k with the prompt's
own token added when it is not among them (`null` for the first), as OpenAI and vLLM give them; offsets from 0.
(OpenAI and vLLM add the sampled token to a generated token's top k too; this server keeps those lists at k, the
size `distill cache from-generated` reads as the API's k.)
`prompt_logprobs`: a list over the prompt's tokens, `null` for the first, else `{"<token id>": {"logprob", "rank",
"decoded_token"}}` holding the prompt's token (its rank: how many tokens are at least as likely) and the top k
(ranks 1 to k).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fastapi.responses import Response

from distill.engine import PIECE_CONTEXT, Sequence, TokenLogprob, added_text
from distill.scoring import PromptScores
from distill.serve.prompts import Prompt
from distill.serve.requests import CompletionRequest

Legacy = dict[str, list[Any]]
CLIENT_GONE = 499  # the status of an answer nobody receives (the client left before it was ready)


class FastJSON(Response):
    """A JSON response encoded by orjson where it is installed (a prompt's log-probs are thousands of numbers), else
    by the standard library, compactly."""

    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        try:
            import orjson
        except ImportError:
            return json.dumps(content, separators=(",", ":"), allow_nan=False).encode()
        return bytes(orjson.dumps(content))


def usage(rows: list[Sequence], prompt_tokens: int) -> dict[str, int]:
    completion = sum(row.generated for row in rows)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion, "total_tokens": prompt_tokens + completion}


def chat_logprobs(entries: list[TokenLogprob]) -> dict[str, Any]:
    def item(token: str, logprob: float) -> dict[str, Any]:
        return {"token": token, "logprob": logprob, "bytes": list(token.encode())}

    shown = [e for e in entries if not e.end]
    return {"content": [item(e.token, e.logprob) | {"top_logprobs": [item(*t) for t in e.top]} for e in shown]}


def chat_choice(index: int, row: Sequence, top: int | None) -> dict[str, Any]:
    return {
        "index": index,
        "message": {"role": "assistant", "content": row.text},
        "logprobs": chat_logprobs(row.logprobs) if top is not None else None,
        "finish_reason": row.finish_reason,
    }


def _with_chosen(top: list[tuple[str, float]], token: str, logprob: float) -> dict[str, float]:
    """The top tokens with the chosen one added when it is not among them."""
    pairs = dict(top)
    pairs.setdefault(token, logprob)
    return pairs


def legacy_logprobs(entries: list[TokenLogprob], start: int) -> Legacy:
    return {
        "tokens": [e.token for e in entries],
        "token_logprobs": [e.logprob for e in entries],
        "top_logprobs": [dict(e.top) for e in entries],
        "text_offset": [start + e.offset for e in entries],
    }


def echoed_logprobs(tokenizer: Any, ids: list[int], scores: PromptScores, k: int) -> Legacy:
    """The legacy log-probs of the prompt's own tokens, with the top `k` at each (module docstring)."""

    def piece(t: int, token: int) -> str:  # the text `token` adds at position t of the prompt
        return added_text(tokenizer, ids[max(0, t - PIECE_CONTEXT) : t], token)

    tokens = [piece(t, token) for t, token in enumerate(ids)]
    offsets = [0]
    for token in tokens[:-1]:
        offsets.append(offsets[-1] + len(token))
    top: list[dict[str, float] | None] = [None]
    for t in range(1, len(ids)):
        pairs = zip(scores.top_ids[t - 1][:k], scores.top_logprobs[t - 1][:k])
        top.append(_with_chosen([(piece(t, a), p) for a, p in pairs], tokens[t], scores.logprobs[t - 1]))
    return {"tokens": tokens, "token_logprobs": [None, *scores.logprobs], "top_logprobs": top, "text_offset": offsets}


def prompt_logprobs(
    token_text: Callable[[int], str], ids: list[int], scores: PromptScores, k: int
) -> list[dict[str, Any] | None]:
    """vLLM's `prompt_logprobs` of a prompt, with the top `k` at each position (module docstring); `token_text`
    decodes one token id alone (`Engine.token_text`, which remembers what it decoded)."""

    def entry(token: int, logprob: float, rank: int) -> dict[str, Any]:
        return {"logprob": logprob, "rank": rank, "decoded_token": token_text(token)}

    assert scores.ranks is not None, "prompt_logprobs show ranks: score the prompt with prompt_ranks"
    positions: list[dict[str, Any] | None] = [None]
    for t in range(1, len(ids)):
        found = {str(ids[t]): entry(ids[t], scores.logprobs[t - 1], scores.ranks[t - 1])}
        for rank, (token, logprob) in enumerate(zip(scores.top_ids[t - 1][:k], scores.top_logprobs[t - 1][:k]), 1):
            if str(token) not in found:
                found[str(token)] = entry(token, logprob, rank)
        positions.append(found)
    return positions


@dataclass(frozen=True)
class Completions:
    """How the choices of one completions request read: its prompts, `n`, and what it asked to see."""

    body: CompletionRequest
    prompts: list[Prompt]
    tokenizer: Any
    token_text: Callable[[int], str]  # one token id decoded alone

    @property
    def n(self) -> int:
        return self.body.n or 1

    def prompt_tokens(self) -> int:
        return sum(len(prompt.ids) for prompt in self.prompts)

    def opening(self, index: int, rows: list[Sequence]) -> tuple[str, Legacy | None, dict[str, Any]]:
        """What choice `index` starts with: the echoed prompt, its log-probs (when shown), and the extra fields."""
        prompt, body = self.prompts[index // self.n], self.body
        scores = rows[index // self.n * self.n].prompt_scores  # the prompt's first choice scored it
        echoed = None
        if body.echo and body.logprobs is not None and scores is not None:
            echoed = echoed_logprobs(self.tokenizer, prompt.ids, scores, body.logprobs)
        extra = {}
        if body.prompt_logprobs is not None and scores is not None:
            extra["prompt_logprobs"] = prompt_logprobs(self.token_text, prompt.ids, scores, body.prompt_logprobs)
        return (prompt.text if body.echo else ""), echoed, extra

    def logprobs(self, index: int, entries: list[TokenLogprob], echoed: Legacy | None) -> Legacy | None:
        """The legacy log-probs of `entries` (generated by choice `index`), after the echoed prompt's."""
        if self.body.logprobs is None:
            return None
        generated = legacy_logprobs(entries, len(self.prompts[index // self.n].text))
        return generated if echoed is None else {key: echoed[key] + generated[key] for key in generated}

    def choice(self, index: int, rows: list[Sequence]) -> dict[str, Any]:
        row = rows[index]
        text, echoed, extra = self.opening(index, rows)
        choice = {"index": index, "text": text + row.text, "logprobs": self.logprobs(index, row.logprobs, echoed)}
        return choice | {"finish_reason": row.finish_reason} | extra
