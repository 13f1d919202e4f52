"""`distill serve`: an OpenAI-compatible HTTP server for a local causal LM folder (a student, or any HF model).

Endpoints: `GET /v1/models`, `GET /v1/models/{id}`, `POST /v1/chat/completions`, `POST /v1/completions`, with
OpenAI's request fields `model`, `n`, `temperature` (0 is greedy), `top_p`, `frequency_penalty` and
`presence_penalty` (-2 to 2, OpenAI's formula on the tokens a choice has generated), `max_tokens`, `stop` (up to 16
strings: OpenAI takes 4, but lm-evaluation-harness adds the end-of-text string to a task's own), `seed`, `stream` and `stream_options.include_usage`; chat also `messages`, `max_completion_tokens` and
`logprobs` (a bool) with `top_logprobs` (0 to 20). The legacy completions endpoint speaks the API as OpenAI and vLLM
do, for clients such as lm-evaluation-harness that score text with it:

- `prompt`: a string, a list of strings, a list of token ids (one prompt) or a list of lists of token ids;
- `max_tokens`: 16 by default, and 0 generates nothing (finish reason "length"), for scoring the prompt alone;
- `logprobs` (0 to 20): the legacy `tokens` / `token_logprobs` / `top_logprobs` / `text_offset` lists, with the top
  k tokens at each position; a generation that ends on the end-of-sequence token ends them with that token;
- `echo`: the text starts with the prompt, and with `logprobs` so do the lists: the prompt's tokens, their
  log-probs (`null` for the first) and top k with the prompt's own token added (`null` for the first);
- `prompt_logprobs` (0 to 20, vLLM's): each choice carries a list over the prompt's tokens, `null` for the first,
  else `{"<token id>": {"logprob", "rank", "decoded_token"}}` with the prompt's token and the top k.

`serve.responses` gives the exact shapes. Prompt log-probs come from one forward pass over the prompts (batched like
generation, `distill.scoring`), the one that also starts their generation; they are available for models whose
logits are their output head applied to their last hidden states, and a request for them to any other model is a
400 `prompt_scoring_unavailable`. Other fields are refused rather than silently ignored, and so are infinite or NaN
numbers.

Every error has OpenAI's body `{"error": {"message", "type", "param", "code"}}`, `param` naming the field:

- a body over `ServeLimits.max_body_bytes`: 413 as soon as the count passes it, chunked or not (`asgi.RequestGuard`);
  JSON nested more than 64 deep: 400;
- a malformed request: 422; unknown model: 404; anything unexpected: 500;
- over the limits of `ServeLimits`, checked before any text is tokenized, whatever form the prompts take: more
  prompts than `max_prompts` (`too_many_prompts`), `n` over `max_n` (`n_too_large`), prompts x n over
  `max_sequences` (`too_many_sequences`), `max_tokens` over `max_tokens` (`max_tokens_too_large`): 400;
- a prompt (plus an explicit `max_tokens`, else one token) longer than the model's context: 400
  `context_length_exceeded`; a prompt of more than `engine.CHARS_PER_TOKEN` characters per token of context is
  refused so before it is tokenized; an empty prompt list or list of token ids (`empty_prompt`), a token id outside
  the vocabulary (`invalid_token_id`): 400.

- `max_tokens` defaults to 16 for completions (as OpenAI's legacy endpoint) and to the rest of the context for chat,
  at most `ServeLimits.max_tokens` either way.
- `completion_tokens` counts the generated tokens, a final end-of-sequence token included; `prompt_tokens` counts
  each prompt once, whatever `n`.
- With `seed`, choice `i` samples with seed `seed + i`: the same request gives the same choices.
- Chat prompts use the tokenizer's chat template when it has one. Otherwise each message becomes one line
  `System: ...`, `User: ...` or `Assistant: ...` (a `developer` message counts as system), and the prompt ends with
  a final line `Assistant:`; the reply is what the model writes after it.

Templating, tokenizing, generating and rendering a response run in worker threads: the event loop only moves bytes,
so one large request does not stall the others. Concurrent requests are batched (`distill.batcher`); streaming
sends `data: {chunk}` server-sent events in OpenAI's chunk format and ends with `data: [DONE]`. A client that
disconnects, streaming or not, cancels its generation: its rows stop at the next step of their batch.

With a `CascadeSetup` the server is an LM cascade: the student answers when its confidence reaches a threshold
(given, or chosen on a validation file), the teacher's OpenAI-compatible endpoint otherwise (`serve.cascade`).

The package: `requests` (bodies, limits, errors), `prompts` (token ids and engine rows), `responses` (shapes),
`streams` (watching the client, server-sent events), `app` (routes, `serve`, `serve_in_thread`); the cascade's
`escalate` (the teacher's endpoint), `calibrate` (the threshold on a validation file), `cascade` (setup, decision,
counts) and `cascade_answers` (its responses).
"""

from distill.asgi import ServeLimits
from distill.serve.app import check_device, create_app, serve, serve_in_thread
from distill.serve.cascade import CascadeSetup
from distill.serve.escalate import TeacherEndpoint
from distill.serve.requests import APIError, ChatRequest, CompletionRequest, Message, chat_prompt, check_limits

__all__ = [
    "APIError",
    "CascadeSetup",
    "ChatRequest",
    "CompletionRequest",
    "Message",
    "ServeLimits",
    "chat_prompt",
    "check_device",
    "check_limits",
    "create_app",
    "serve",
    "serve_in_thread",
    "TeacherEndpoint",
]
