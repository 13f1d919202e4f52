"""A teacher that is a `torch.nn.Module` in this process."""

from __future__ import annotations

import hashlib

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distill.teachers import TeacherOutput


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


class LocalTeacher:
    """Runs `model` in eval mode without gradients and returns its dense log-probabilities."""

    def __init__(self, model: nn.Module, num_classes: int, device: str | torch.device = "cpu"):
        self.model = model.to(device).eval()
        for parameter in self.model.parameters():
            parameter.requires_grad_(False)
        self.num_classes = num_classes
        self.device = torch.device(device)

    @torch.no_grad()
    def __call__(self, batch: dict[str, Tensor]) -> TeacherOutput:
        logits = logits_of(self.model(batch["inputs"].to(self.device)))  # (B, C)
        return TeacherOutput(logprobs=F.log_softmax(logits.float(), dim=-1))


def fingerprint(model: nn.Module) -> str:
    """sha256 over a model's parameter names, shapes and values: identifies a teacher in cache manifests."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
