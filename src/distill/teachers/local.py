"""A teacher that is a `torch.nn.Module` in this process."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distill.compute import DTYPES
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


def cast_floating(value: Any, dtype: torch.dtype) -> Any:
    """`value` (a tensor, or a mapping of them) with its floating-point tensors cast to `dtype` (token ids and masks
    kept)."""
    if isinstance(value, Tensor):
        return value.to(dtype) if value.is_floating_point() else value
    if isinstance(value, Mapping):
        return {k: cast_floating(v, dtype) for k, v in value.items()}
    return value


class LocalTeacher:
    """Runs `model` in eval mode without gradients; returns its dense log-probabilities (when `has_logits`) and the
    outputs of the modules named in `capture` (for feature distillation), in float32 whatever its precision.

    It computes in the dtype of its weights (`cast`), outside any autocast of the caller: the student may train
    under bf16 autocast while its teacher stays float32, or the other way round."""

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
        self.dtype: torch.dtype | None = None  # the precision it was cast to (`cast`); None: as given

    def cast(self, precision: str) -> None:
        """Run in `precision` (fp32, bf16, fp16) from now on: the weights are cast once, in place (what halves a
        large teacher's memory in bf16), and floating inputs are cast to match at each call."""
        self.dtype = DTYPES[precision]
        self.model.to(dtype=self.dtype)

    @torch.no_grad()
    def __call__(self, batch: dict[str, Any]) -> TeacherOutput:
        from distill.features import capture

        inputs = to_device(batch["inputs"], self.device)
        if self.dtype is not None:
            inputs = cast_floating(inputs, self.dtype)
        with capture(self.model, self.capture) as captured, torch.autocast(self.device.type, enabled=False):
            output = run_model(self.model, inputs)
        logprobs = F.log_softmax(logits_of(output).float(), dim=-1) if self.has_logits else None  # (..., C)
        hidden = dict(captured) if self.dtype is None else cast_floating(captured, torch.float32)
        return TeacherOutput(logprobs=logprobs, hidden_states=hidden if self.capture else None)


def fingerprint(model: nn.Module) -> str:
    """sha256 over a model's parameter names, shapes and values: identifies a teacher in cache manifests."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
