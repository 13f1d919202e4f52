"""How confident a language model is in one answer: what an LM cascade compares with its threshold.

Two measures, each a number that grows with confidence:

- `logprob` (the default): the answer's mean token log-prob, (1/T) sum_t log p(y_t | x, y_<t), over the T tokens
  the model generated (a final end-of-sequence token included), under its raw distribution (temperature 1). In
  (-inf, 0]; 0 means every token was certain.
- `agreement`: the share of k further answers, sampled at `sample_temperature`, whose answer is the same as this
  one (self-consistency, Wang et al. 2023). In [0, 1]; costs k more generations per prompt.

What "the same answer" means is `answers`: `text` compares the whole answers (whitespace normalised); `final`
compares their final answers as the reasoning traces write them ("#### 42", `\\boxed{}`, "The answer is 42"; numbers
by value, `distill.generate.verify`). With `verify` (final answers only) a task's verifier comes first: an answer
that does not end with a well-formed answer line "#### <number>" has confidence -inf, so it goes to the teacher
whatever the threshold.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Annotated, Literal

from pydantic import Field, model_validator

from distill.config import Strict
from distill.generate.verify import extract_answer, normalize_number, verify
from distill.scoring import MIN_LOGPROB

Measure = Literal["logprob", "agreement"]
Answers = Literal["text", "final"]
MEASURES: tuple[str, ...] = ("logprob", "agreement")
ANSWERS: tuple[str, ...] = ("text", "final")
ANSWER_LINE = re.compile(r"####[ \t]*(\S[^\n]*?)[ \t]*")  # the last non-empty line of a well-formed answer


class ConfidenceConfig(Strict):
    """How an LM cascade measures the student's confidence in an answer (module docstring)."""

    measure: Measure = Field("logprob", description="logprob: mean token log-prob; agreement: of k sampled answers")
    samples: Annotated[int, Field(ge=1, le=32)] = Field(5, description="agreement: answers sampled per prompt (k)")
    sample_temperature: Annotated[float, Field(gt=0, le=2)] = Field(
        1.0, description="agreement: the temperature the k answers are sampled at"
    )
    answers: Answers = Field("text", description="text: whole answers compared; final: their final answers")
    verify: bool = Field(
        False, description="final answers: an answer without a well-formed last line '#### <number>' is escalated"
    )

    @model_validator(mode="after")
    def _verify_needs_final_answers(self) -> ConfidenceConfig:
        if self.verify and self.answers != "final":
            raise ValueError("verify checks the final answer line '#### <number>': set answers to final")
        return self


def well_formed(text: str) -> bool:
    """The verifier of answers written as the reasoning recipe's: the last non-empty line is "#### <number>"."""
    lines = [line for line in text.strip().splitlines() if line.strip()]
    if not lines:
        return False
    match = ANSWER_LINE.fullmatch(lines[-1].strip())
    return match is not None and normalize_number(match[1]) is not None


def final_answer(text: str, answers: Answers) -> str | None:
    """What two answers are compared by: the whole text (whitespace normalised), or its final answer (or None)."""
    return " ".join(text.split()) if answers == "text" else extract_answer(text)


def reference_answer(text: str, answers: Answers) -> str | None:
    """A reference (a gold answer or the teacher's): as `final_answer`, except that a bare final answer ("42")
    is its own final answer."""
    if answers == "text":
        return final_answer(text, answers)
    return extract_answer(text) or normalize_number(text.strip()) or (text.strip() or None)


def same_answer(answer: str, reference: str, answers: Answers) -> bool:
    """Whether `answer` gives the same answer as `reference` (a gold answer, the teacher's, another sample)."""
    wanted = reference_answer(reference, answers)
    if wanted is None:
        return False
    if answers == "text":
        return final_answer(answer, answers) == wanted
    return verify(final_answer(answer, answers), wanted).ok


def mean_logprob(logprobs: Sequence[float]) -> float:
    """The mean of an answer's token log-probs; an answer of no tokens has the lowest (`scoring.MIN_LOGPROB`)."""
    return math.fsum(logprobs) / len(logprobs) if logprobs else MIN_LOGPROB


def agreement(answer: str, samples: Sequence[str], answers: Answers) -> float:
    """The share of `samples` that give the same answer as `answer`."""
    if not samples:
        raise ValueError("agreement needs at least one sampled answer")
    return sum(same_answer(sample, answer, answers) for sample in samples) / len(samples)


def confidence(config: ConfidenceConfig, text: str, logprobs: Sequence[float], samples: Sequence[str]) -> float:
    """The student's confidence in its answer `text` (its token log-probs `logprobs`; `samples`: the k sampled
    answers when the measure is agreement); -inf when `config.verify` and the answer line is missing or malformed."""
    if config.verify and not well_formed(text):
        return -math.inf
    if config.measure == "agreement":
        return agreement(text, samples, config.answers)
    return mean_logprob(logprobs)
