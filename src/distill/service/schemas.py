"""Request bodies of the service's own resources (the job configs themselves are the library's models)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from distill.lm_confidence import ConfidenceConfig


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class JobCreate(_Body):
    """`POST /v1/jobs`: a job kind and its config (the pydantic model the CLI uses for that kind)."""

    kind: str = Field("recipe", description="recipe, train, train-lm, cache-build, generate or evaluate")
    config: dict[str, Any] = Field(default_factory=dict, description="the kind's config; ids instead of paths")
    name: str | None = Field(None, max_length=200, description="a label for people")


class DeploymentCreate(_Body):
    """`POST /v1/deployments`: a cascade of a finished student and its teacher (a classifier and the teacher it was
    distilled from; or a causal LM and a teacher behind an OpenAI-compatible endpoint, `service/cascade_lm.py`)."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$", description="the model id clients will use")
    student: str = Field(
        description="a finished job (job-...) whose student answers first; job-.../NAME for another of its LM models"
    )
    target_agreement: float = Field(
        0.95, gt=0, le=1, description="agreement with the teacher to keep, at least (LM students with gold answers "
        "in the validation file: the share of the teacher's accuracy to keep)",
    )  # fmt: skip
    assurance: float = Field(
        0.95, gt=0, lt=1, description="confidence that the threshold keeps target_agreement beyond the validation "
        "inputs: a lower confidence bound at this level must reach it (0.5: the point estimate)",
    )  # fmt: skip
    validation: str | None = Field(
        None,
        description="an uploaded file (file-...) to choose the threshold on: inputs for a classifier (mnist1d jobs "
        "may omit it), JSONL of prompts with the teacher's or gold answers for an LM student",
    )
    validation_size: int = Field(2000, ge=50, le=100_000, description="generated inputs when no file is given")
    teacher: str | None = Field(
        None,
        description="LM students: the teacher's model id, a model of this service (job-.../NAME; default: the job's "
        "job-.../teacher) or, with teacher_endpoint, the model at that endpoint",
        max_length=200,
    )
    teacher_endpoint: str | None = Field(
        None, max_length=100, description="LM students: one of the service's teacher endpoints (DISTILL_TEACHERS)"
    )
    confidence: ConfidenceConfig | None = Field(
        None, description="LM students: how the student's confidence in an answer is measured (default: mean log-prob)"
    )
    max_tokens: int = Field(256, ge=1, le=1_000_000, description="LM students: tokens per validation answer, at most")

    def lm_fields(self) -> list[str]:
        """The LM-only fields this body sets."""
        given = [f for f in ("teacher", "teacher_endpoint", "confidence") if getattr(self, f) is not None]
        return given + (["max_tokens"] if "max_tokens" in self.model_fields_set else [])


class KeyCreate(_Body):
    """`POST /v1/keys` (admin)."""

    scopes: list[str] = Field(min_length=1)
    name: str = Field("", max_length=200)
