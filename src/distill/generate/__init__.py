"""Generation with a teacher behind an API: its client (client.py), answers to prompts (answers.py), reasoning traces
(cot.py), answer verification (verify.py), generated word problems (problems.py) and how models solve them (solve.py)."""

from distill.generate.answers import (
    GenerateSummary,
    PromptRecord,
    RequestParams,
    agenerate,
    apply_template,
    generate,
    read_prompts,
)

__all__ = [
    "GenerateSummary",
    "PromptRecord",
    "RequestParams",
    "agenerate",
    "apply_template",
    "generate",
    "read_prompts",
]
