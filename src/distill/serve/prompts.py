"""A request's prompts as token ids, each checked against the model's context, and the engine rows they become.

Run in a worker thread (tokenizing is the slow part). A text is refused (400 `context_length_exceeded`) before it is
tokenized when it is longer than `engine.CHARS_PER_TOKEN` characters per token of context, and once tokenized when
it leaves no room for the completion: an explicit `max_tokens` (0 included), else one token. A prompt of token ids
is refused (400) when it is empty or holds an id outside the vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass

from distill.engine import Engine, PromptTooLong, SamplingParams, Sequence
from distill.serve.requests import APIError, SamplingRequest

TOO_LONG = "context_length_exceeded"


@dataclass(frozen=True)
class Prompt:
    ids: list[int]
    text: str  # as given, or the token ids decoded: what `echo` repeats


def encode_texts(
    engine: Engine, texts: list[str], special: bool, max_tokens: int | None, param: str, token_param: str
) -> list[Prompt]:
    """Each text tokenized (with the tokenizer's special tokens when `special`) and checked against the context."""
    prompts = []
    for text in texts:
        try:
            ids = engine.encode(text, special_tokens=special)
        except PromptTooLong as error:
            message = (
                f"the prompt is {error.chars} characters, more than this model's context of {engine.context} tokens "
                f"can hold (it reads at most {error.max_chars} characters); shorten the prompt"
            )
            raise APIError(400, message, TOO_LONG, param=param) from None
        check_room(engine, ids, max_tokens, param, token_param)
        prompts.append(Prompt(ids, text))
    return prompts


def token_prompts(engine: Engine, prompts: list[list[int]], max_tokens: int | None) -> list[Prompt]:
    """Prompts given as token ids, checked (non-empty, in the vocabulary, within the context) and decoded."""
    checked = []
    for index, ids in enumerate(prompts):
        where = "prompt" if len(prompts) == 1 else f"prompt.{index}"
        if not ids:
            message = f"{where} is an empty list of token ids; give at least one"
            raise APIError(400, message, "empty_prompt", param=where)
        outside = next((token for token in ids if not 0 <= token < engine.vocab_size), None)
        if outside is not None:
            message = f"{where} holds token id {outside}, outside this model's vocabulary of {engine.vocab_size}"
            raise APIError(400, message, "invalid_token_id", param=where)
        check_room(engine, ids, max_tokens, where, "max_tokens")
        checked.append(Prompt(list(ids), engine.decode(ids)))
    return checked


def read_prompts(engine: Engine, prompts: list[str] | list[list[int]], max_tokens: int | None) -> list[Prompt]:
    """A completions request's prompts (texts or token ids) as checked `Prompt`s; none at all is a 400."""
    if not prompts:
        raise APIError(400, "prompt is an empty list; give at least one prompt", "empty_prompt", param="prompt")
    if isinstance(prompts[0], str):
        texts = [text for text in prompts if isinstance(text, str)]
        return encode_texts(engine, texts, True, max_tokens, "prompt", "max_tokens")
    return token_prompts(engine, [ids for ids in prompts if isinstance(ids, list)], max_tokens)


def check_room(engine: Engine, ids: list[int], max_tokens: int | None, param: str, token_param: str) -> None:
    """Refuse (400) a prompt that leaves no room in the context for `max_tokens` tokens (None: for one)."""
    room = engine.context - len(ids)
    prompt = f"the prompt is {len(ids)} tokens and this model's context is {engine.context} tokens"
    if room < 0 or (max_tokens is None and room < 1):
        raise APIError(400, f"{prompt}: no room is left for a completion; shorten the prompt", TOO_LONG, param=param)
    if max_tokens is not None and max_tokens > room:
        message = f"{prompt}: {token_param} {max_tokens} does not fit; ask for at most {room}"
        raise APIError(400, message, TOO_LONG, param=token_param)


def sampling_rows(
    engine: Engine,
    prompts: list[Prompt],
    body: SamplingRequest,
    max_tokens: int | None,
    default: int,
    top: int | None,
    prompt_top: int | None = None,
    ranked: bool = False,
) -> list[Sequence]:
    """One `Sequence` per prompt and choice (prompt-major, as OpenAI numbers the choices). Without an explicit
    `max_tokens` a choice gets `default` tokens, cut to the room the context leaves. The first choice of each prompt
    scores it when `prompt_top` is set (the others share its scores), with its tokens' ranks when `ranked`."""
    rows = []
    for prompt in prompts:
        for choice in range(body.n or 1):
            params = SamplingParams(
                max_tokens=min(default, engine.context - len(prompt.ids)) if max_tokens is None else max_tokens,
                temperature=1.0 if body.temperature is None else body.temperature,
                top_p=1.0 if body.top_p is None else body.top_p,
                seed=None if body.seed is None else (body.seed + choice) % 2**63,
                stop=body.stops(),
                top_logprobs=top,
                frequency_penalty=body.frequency_penalty or 0.0,
                presence_penalty=body.presence_penalty or 0.0,
                prompt_logprobs=prompt_top if choice == 0 else None,
                prompt_ranks=ranked,
            )
            rows.append(Sequence(list(prompt.ids), params))
    return rows
