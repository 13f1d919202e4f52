"""A teacher that is a `torch.nn.Module` in this process."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distill.teachers.protocol import TeacherOutput


def logits_of(output: object) -> Tensor:
    """Logits from a module's output: a tensor, or an object/dict with `logits` (Hugging Face models)."""
    if isinstance(output, Tensor):
        return output
    logits = getattr(output, "logits", None)
    if logits is None and isinstance(output, dict):
        logits = output.get("logits")
    if not isinstance(logits, Tensor):
        raise TypeError(
            f"teacher returned {type(output).__name__}; expected a tensor of logits or an object with .logits"
        )
    return logits


def run_model(model: nn.Module, inputs: Any) -> Any:
    """Call a model on a batch's inputs: keyword arguments for a dict (tokenized text), one tensor otherwise."""
    return model(**inputs) if isinstance(inputs, Mapping) else model(inputs)


def to_device(value: Any, device: torch.device) -> Any:
    if isinstance(value, Tensor):
        return value.to(device, non_blocking=True)
    if isinstance(value, Mapping):
        return {k: to_device(v, device) for k, v in value.items()}
    return value


class LocalTeacher:
    """Runs `model` in eval mode without gradients; returns its dense log-probabilities (when `has_logits`) and the
    outputs of the modules named in `capture` (for feature distillation)."""

    def __init__(
        self,
        model: nn.Module,
        num_classes: int,
        device: str | torch.device = "cpu",
        capture: Sequence[str] = (),
        has_logits: bool = True,
    ):
        self.model = model.to(device).eval()
        for parameter in self.model.parameters():
            parameter.requires_grad_(False)
        self.num_classes = num_classes
        self.device = torch.device(device)
        self.capture = list(capture)
        self.has_logits = has_logits

    @torch.no_grad()
    def __call__(self, batch: dict[str, Any]) -> TeacherOutput:
        from distill.features import capture

        inputs = batch["inputs"]
        with capture(self.model, self.capture) as captured:
            output = run_model(self.model, to_device(inputs, self.device))
        logprobs = F.log_softmax(logits_of(output).float(), dim=-1) if self.has_logits else None  # (..., C)
        return TeacherOutput(logprobs=logprobs, hidden_states=dict(captured) if self.capture else None)


def fingerprint(model: nn.Module) -> str:
    """sha256 over a model's parameter names, shapes and values: identifies a teacher in cache manifests."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
