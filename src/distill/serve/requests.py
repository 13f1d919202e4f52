"""The request bodies `distill serve` takes (OpenAI's chat and legacy completions, with vLLM's `prompt_logprobs`),
its error type, and the limits every request is held to before anything is tokenized.

A body that does not validate is a 422 (`asgi.install_error_handlers` gives it OpenAI's shape, the field in
`param`); unknown fields are refused rather than ignored, and so are infinite or NaN numbers.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, cast

from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationError, WrapValidator, model_validator
from pydantic_core import PydanticCustomError

from distill.asgi import ServeLimits

ROLE_NAMES = {"system": "System", "developer": "System", "user": "User", "assistant": "Assistant"}
StopText = Annotated[str, Field(min_length=1, max_length=1_000)]
MAX_STOPS = 16  # OpenAI takes 4; lm-evaluation-harness adds the end-of-text string to a task's own (vLLM: no cap)
Penalty = Annotated[float, Field(ge=-2.0, le=2.0)]
TopCount = Annotated[int, Field(ge=0, le=20)]


def _one_prompt_error(value: Any, handler: Any) -> Any:
    """One message for a prompt of none of the four forms (instead of one per form)."""
    try:
        return handler(value)
    except ValidationError:
        message = "must be a string, a list of strings, a list of token ids or a list of lists of token ids"
        raise PydanticCustomError("prompt_form", message) from None


PromptField = Annotated[
    str | list[str] | list[StrictInt] | list[list[StrictInt]], WrapValidator(_one_prompt_error)
]  # token ids are checked against the vocabulary once tokens are read (400)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class SamplingRequest(BaseModel):
    """The fields chat and completions share."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    model: str
    n: int | None = Field(None, ge=1)  # at most ServeLimits.max_n (400 n_too_large)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    max_tokens: int | None = Field(None, ge=1)  # at most ServeLimits.max_tokens (400 max_tokens_too_large)
    stop: StopText | Annotated[list[StopText], Field(max_length=MAX_STOPS)] | None = None
    seed: int | None = None
    frequency_penalty: Penalty | None = None
    presence_penalty: Penalty | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    user: str | None = None

    def stops(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())

    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class Message(BaseModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ChatRequest(SamplingRequest):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    top_logprobs: TopCount | None = None

    @model_validator(mode="after")
    def _top_logprobs_need_logprobs(self) -> ChatRequest:
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        return self

    def token_limit(self) -> tuple[int | None, str]:
        """The completion length asked for (`max_completion_tokens` first), and the field that asked."""
        if self.max_completion_tokens is not None:
            return self.max_completion_tokens, "max_completion_tokens"
        return self.max_tokens, "max_tokens"


class CompletionRequest(SamplingRequest):
    prompt: PromptField
    max_tokens: int | None = Field(None, ge=0)  # 0: nothing is generated (echo and prompt_logprobs still answer)
    logprobs: TopCount | None = None
    echo: bool | None = None
    prompt_logprobs: TopCount | None = None  # vLLM's: each prompt token's log-prob, with the top k

    def prompts(self) -> list[str] | list[list[int]]:
        """The prompts, as a list of texts or a list of token-id lists (a list of ints is one prompt)."""
        if isinstance(self.prompt, str):
            return [self.prompt]
        if self.prompt and isinstance(self.prompt[0], int):
            return [cast(list[int], self.prompt)]
        return cast("list[str] | list[list[int]]", self.prompt)

    def prompt_top(self) -> int | None:
        """How many most likely tokens each prompt position needs, or None when the prompt is not scored: `echo`
        with `logprobs` shows the prompt's log-probs, `prompt_logprobs` asks for them."""
        wanted = [self.prompt_logprobs]
        if self.echo and self.logprobs is not None:
            wanted.append(self.logprobs)
        counts = [k for k in wanted if k is not None]
        return max(counts) if counts else None


class APIError(Exception):
    """An error answered with OpenAI's error body."""

    def __init__(
        self, status: int, message: str, code: str, kind: str = "invalid_request_error", param: str | None = None
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.kind, self.param = status, message, code, kind, param


def check_limits(limits: ServeLimits, prompts: int, n: int, max_tokens: int | None, param: str = "max_tokens") -> None:
    """Refuse (APIError 400, `param` naming the field) a request of `prompts` prompts x `n` choices of up to
    `max_tokens` tokens that asks more than `limits` allow. Cheap: called before any text is tokenized."""
    if prompts > limits.max_prompts:
        message = f"{prompts} prompts in one request; this server takes at most {limits.max_prompts}"
        raise APIError(400, message, "too_many_prompts", param="prompt")
    if n > limits.max_n:
        raise APIError(400, f"n is {n}; this server gives at most {limits.max_n} choices", "n_too_large", param="n")
    if prompts * n > limits.max_sequences:
        message = (
            f"{prompts} prompts x n={n} make {prompts * n} sequences; this server generates at most "
            f"{limits.max_sequences} per request"
        )
        raise APIError(400, message, "too_many_sequences", param="n")
    if max_tokens is not None and max_tokens > limits.max_tokens:
        message = f"{param} is {max_tokens}; this server generates at most {limits.max_tokens} tokens per choice"
        raise APIError(400, message, "max_tokens_too_large", param=param)


def chat_prompt(tokenizer: Any, messages: list[Message]) -> tuple[str, bool]:
    """The prompt text for `messages`, and whether the tokenizer should still add its special tokens."""
    if getattr(tokenizer, "chat_template", None):
        turns = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in messages]
        return str(tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)), False
    lines = [f"{ROLE_NAMES[m.role]}: {m.text()}" for m in messages]
    return "\n".join([*lines, "Assistant:"]), True
