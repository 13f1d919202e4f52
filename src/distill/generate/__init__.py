"""Generation with a teacher: sampling answers to prompts (sample.py), reasoning traces, answer verification."""

from distill.generate.sample import (
    GenerateSummary,
    PromptRecord,
    SamplingParams,
    agenerate,
    apply_template,
    generate,
    read_prompts,
)

__all__ = [
    "GenerateSummary",
    "PromptRecord",
    "SamplingParams",
    "agenerate",
    "apply_template",
    "generate",
    "read_prompts",
]
