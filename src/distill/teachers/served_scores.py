"""A server's teacher-forced scores of a prompt, as it answers them, read into token ids and log-probs
(`served_cache` builds a token cache from them). Two formats of `/completions`, asked for in this order:

    prompt_logprobs  vLLM's: {"prompt": [ids], "prompt_logprobs": k, "max_tokens": 0 (or 1)}; the choice's
                     `prompt_logprobs` is a list, None first, then for each token j a dict {"<id>": {"logprob",
                     "rank", "decoded_token"}} holding token j itself and the k most likely tokens
    echo             OpenAI's legacy: {"prompt": [ids], "echo": true, "logprobs": k, "max_tokens": 0}; the choice's
                     `logprobs` holds `tokens` (texts), `token_logprobs` and `top_logprobs` ({text: logprob}, the k
                     most likely, some servers adding the sent token), each None first

Entry j is the teacher's distribution of token j given the tokens before it. With prompt_logprobs the ids are the
server's; with echo the alternatives come back as texts and map to ids through the student's vocabulary as
`api_logprobs` maps them (a text that no single id gives is left out), the sent token's id and log-prob being known.

The texts the server reports for the sent tokens are what the tokenizer check compares (`same_text`): servers report
the text a token adds after the tokens before it (`pieces`, as `api_logprobs.token_pieces`) or the token decoded
alone (vLLM's V1 engine, `distill serve`'s prompt_logprobs).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from distill.engine import PIECE_CONTEXT
from distill.teachers.api_logprobs import REPLACEMENT, VocabularyText

# The formats asked for, in this order: prompt_logprobs scoring alone (max_tokens 0: `distill serve`), then with one
# token generated (servers that refuse 0 without echo, such as vLLM), then echo.
SCORING = ("prompt_logprobs", "prompt_logprobs+1", "echo")
Pairs = tuple[list[int], list[float]]  # the ids a server gave at one position, and their log-probs


class Unscorable(Exception):
    """An answer without what its format promises (the server does not speak that format)."""


def request(mode: str, ids: list[int], top_k: int) -> dict[str, Any]:
    """The body (less the model) asking for the top-`top_k` log-probs of every token of `ids` in format `mode`."""
    if mode == "echo":
        return {"prompt": ids, "max_tokens": 0, "echo": True, "logprobs": top_k}
    return {"prompt": ids, "max_tokens": 1 if mode == "prompt_logprobs+1" else 0, "prompt_logprobs": top_k}


def read_answer(
    mode: str, choice: Mapping[str, Any], ids: list[int], wanted: list[int], vocabulary: VocabularyText | None
) -> tuple[list[str], list[Pairs], int]:
    """(the server's text of tokens 1.., the ids and log-probs it gave at entries `wanted`, the most top entries it
    gave at one of them); Unscorable when the answer lacks them or is malformed."""
    try:
        if mode.startswith("prompt_logprobs"):
            return _from_prompt_logprobs(choice, ids, wanted)
        assert vocabulary is not None
        return _from_echo(choice, ids, wanted, vocabulary)
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        raise Unscorable(f"malformed {mode} ({type(error).__name__}: {error})") from None


def _from_prompt_logprobs(
    choice: Mapping[str, Any], ids: list[int], wanted: list[int]
) -> tuple[list[str], list[Pairs], int]:
    """(the server's text of tokens 1.., the ids and log-probs at entries `wanted`, the most top entries at one)."""
    entries = choice.get("prompt_logprobs")
    if not isinstance(entries, list) or len(entries) < len(ids):
        raise Unscorable(
            "no prompt_logprobs" if entries is None else f"{len(entries)} prompt_logprobs, {len(ids)} tokens"
        )
    texts = []
    for j in range(1, len(ids)):
        own = entries[j].get(str(ids[j]))
        if not isinstance(own, Mapping) or not isinstance(own.get("decoded_token"), str):
            raise Unscorable(f"entry {j} does not hold the sent token {ids[j]} with its decoded_token")
        texts.append(own["decoded_token"])
    candidates, returned = [], 0
    for j in wanted:
        entry = entries[j]
        candidates.append((list(map(int, entry)), [float(value["logprob"]) for value in entry.values()]))
        others = len(entry) - 1  # the server's top m, and the sent token: m = others + 1 if its rank <= others
        returned = max(returned, others + (int(entry[str(ids[j])].get("rank") or 1) <= others))
    return texts, candidates, returned


def _from_echo(
    choice: Mapping[str, Any], ids: list[int], wanted: list[int], vocabulary: VocabularyText
) -> tuple[list[str], list[Pairs], int]:
    """`_from_prompt_logprobs` for OpenAI's legacy echo: alternatives as texts, mapped to the student's ids."""
    logprobs = choice.get("logprobs")
    if not isinstance(logprobs, Mapping) or not isinstance(logprobs.get("tokens"), list):
        raise Unscorable("no echoed tokens with log-probs")
    tokens, values, tops = logprobs["tokens"], logprobs["token_logprobs"], logprobs.get("top_logprobs") or []
    if min(len(tokens), len(values), len(tops)) < len(ids):
        raise Unscorable(f"{len(tokens)} echoed tokens and {len(tops)} top_logprobs for {len(ids)} tokens sent")
    candidates, returned = [], 0
    for j in wanted:
        found, logprobs = [ids[j]], [float(values[j])]  # the sent token: its id is known
        for text, logprob in (tops[j] or {}).items():
            mapped = vocabulary.id_of(text, first=False)
            if mapped is not None and mapped != ids[j]:
                found.append(mapped)
                logprobs.append(float(logprob))
        candidates.append((found, logprobs))
        returned = max(returned, _top_size(tops[j] or {}, str(tokens[j])))
    return [str(t) for t in tokens[1 : len(ids)]], candidates, returned


def _top_size(top: Mapping[str, Any], sent: str) -> int:
    """The m of the server's top m in `top` ({text: log-prob}), which some servers give with the sent token added."""
    if sent not in top:
        return len(top)
    rank = 1 + sum(float(value) > float(top[sent]) for value in top.values())
    return len(top) - 1 + (rank <= len(top) - 1)


def same_text(theirs: str, ours: str) -> bool:
    """Whether a server's text of a token is the student's, spaces at the ends aside; an empty text, or one holding
    part of a UTF-8 character, proves nothing either way."""
    theirs, ours = theirs.strip(), ours.strip()
    return theirs == ours or not theirs or not ours or REPLACEMENT in theirs + ours


def decode_batch(tokenizer: Any, rows: list[list[int]], skip_special_tokens: bool = True) -> list[str]:
    """`tokenizer.batch_decode(rows, clean_up_tokenization_spaces=False)`, through the Rust tokenizer itself when
    there is one (the same texts, without transformers' conversion of every id)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        return [str(t) for t in backend.decode_batch(rows, skip_special_tokens=skip_special_tokens)]
    texts = tokenizer.batch_decode(rows, skip_special_tokens=skip_special_tokens, clean_up_tokenization_spaces=False)
    return [str(t) for t in texts]


def pieces(tokenizer: Any, ids: list[int]) -> list[str]:
    """The text each of `ids` adds after the ones before it: `api_logprobs.token_pieces`, in one batched decode."""
    contexts = [ids[max(0, j - PIECE_CONTEXT) : j] for j in range(len(ids))]
    texts = decode_batch(tokenizer, [*contexts, *([*context, token] for context, token in zip(contexts, ids))])
    return [texts[len(ids) + j][len(texts[j]) :] for j in range(len(ids))]
