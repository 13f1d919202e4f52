"""Request bodies of the service's own resources (the job configs themselves are the library's models)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class JobCreate(_Body):
    """`POST /v1/jobs`: a job kind and its config (the pydantic model the CLI uses for that kind)."""

    kind: str = Field("recipe", description="recipe, train, train-lm, cache-build, generate or evaluate")
    config: dict[str, Any] = Field(default_factory=dict, description="the kind's config; ids instead of paths")
    name: str | None = Field(None, max_length=200, description="a label for people")


class DeploymentCreate(_Body):
    """`POST /v1/deployments`: a cascade of a finished classifier student and its teacher."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$", description="the model id clients will use")
    student: str = Field(description="a finished job (job-...) whose student answers first")
    target_agreement: float = Field(0.95, gt=0, le=1, description="agreement with the teacher to keep, at least")
    validation: str | None = Field(
        None, description="an uploaded file (file-...) of inputs to choose the threshold on; mnist1d jobs may omit it"
    )
    validation_size: int = Field(2000, ge=50, le=100_000, description="generated inputs when no file is given")


class KeyCreate(_Body):
    """`POST /v1/keys` (admin)."""

    scopes: list[str] = Field(min_length=1)
    name: str = Field("", max_length=200)
