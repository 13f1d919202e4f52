"""A teacher that is a `torch.nn.Module` in this process."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distill.compute import DTYPES
from distill.teachers.lm_head import TeacherHead, chunked_top_k, final_hidden, head_parts
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

    A causal LM teacher also gives its final hidden states and output projection (`final_hidden`), from which the
    chunked LM loss forms its log-probs chunk by chunk, and its top-k at chosen positions (`top_k_at`), formed the
    same way: the (tokens x vocabulary) log-probs of `__call__` never exist then.

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

    @torch.no_grad()
    def final_hidden(self, batch: dict[str, Any]) -> TeacherHead | None:
        """The teacher's final hidden states (B, T, H_t) and output projection for the batch, computed as
        `__call__` computes (on its device, in its precision, outside the caller's autocast); None when the model
        has no reachable head (`distill.teachers.lm_head.head_parts`) or features are captured: the caller then
        uses `__call__`'s full log-probs."""
        if self.capture or not self.has_logits or head_parts(self.model) is None:
            return None
        inputs = to_device(batch["inputs"], self.device)
        if not isinstance(inputs, Mapping):
            return None
        if self.dtype is not None:
            inputs = cast_floating(inputs, self.dtype)
        with torch.autocast(self.device.type, enabled=False):
            return final_hidden(self.model, dict(inputs))

    @torch.no_grad()
    def top_k_at(self, batch: dict[str, Any], positions: Tensor, k: int) -> tuple[Tensor, Tensor] | None:
        """Its k likeliest next tokens at `positions` (P, 2: row, position) of the batch: log-probs (P, k) float32,
        largest first, and ids (P, k), formed chunk by chunk from its final hidden states (`chunked_top_k`); None
        when the model has no reachable head."""
        found = self.final_hidden(batch)
        if found is None:
            return None
        where = positions.to(found.hidden.device)
        hidden = found.hidden[where[:, 0], where[:, 1]]  # (P, H_t)
        values, ids, _ = chunked_top_k(hidden, found.weight, found.bias, k)  # (P, k) x2
        return values, ids


def fingerprint(model: nn.Module) -> str:
    """sha256 over a model's parameter names, shapes and values: identifies a teacher in cache manifests."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
