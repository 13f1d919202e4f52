"""How a model computes while it trains: in which precision (`train.precision`, `train.teacher_precision`) and
whether the student's activations are kept or recomputed (`train.activation_checkpointing`).

Mixed precision (Micikevicius et al. 2018): the student's weights and optimizer state stay float32; its forward
runs under `torch.autocast` in bfloat16 or float16, and float16 adds a gradient scaler (the loss is multiplied
before backward so that small gradients do not underflow, the gradients divided back before clipping and the
optimizer, a step with non-finite gradients skipped and the scale lowered). The losses are computed in float32
(`distill.chunked` casts each chunk's logits; `distill.losses` casts its inputs). A live teacher has its weights
cast once to its precision (`distill.teachers.local.LocalTeacher.cast`) and runs outside the student's autocast.

Activation checkpointing (Chen et al. 2016): a Hugging Face student keeps only each transformer block's input in
the forward pass and recomputes the block in the backward pass (transformers' activation checkpointing, non-reentrant,
which also replays the block's dropout masks), trading about one more forward pass for the activations' memory.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import torch
from torch import nn

from distill.errors import DistillError


def check_device(device: str) -> torch.device:
    """`device` as a torch.device, after refusing (DistillError) one that this machine does not have, before any
    model is loaded or moved."""
    try:
        kind = torch.device(device)
    except (RuntimeError, ValueError):
        raise DistillError(f"{device!r} is not a device; use cpu, cuda, cuda:N or mps") from None
    if kind.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (kind.index or 0) >= count:
            have = f"cuda:0 to cuda:{count - 1}" if count else "no CUDA device"
            raise DistillError(f"cannot run on {device}: this machine has {have}")
    elif kind.type == "mps" and not torch.backends.mps.is_available():
        raise DistillError(f"cannot run on {device}: this machine has no MPS device")
    elif kind.type not in ("cpu", "cuda", "mps"):
        raise DistillError(f"cannot run on {device}; use cpu, cuda, cuda:N or mps")
    return kind


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def autocast_dtype(device: torch.device, precision: str) -> torch.dtype | None:
    """The dtype the student's forward runs in under autocast on `device` (None for fp32: no autocast), after
    checking that torch's autocast (and, for fp16, its gradient scaler) works there: torch turns autocast off with
    a warning where the device or dtype is not supported, which would silently train in float32."""
    if precision == "fp32":
        return None
    dtype = DTYPES[precision]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            with torch.autocast(device.type, dtype=dtype):
                enabled = torch.is_autocast_enabled(device.type)
            if precision == "fp16":
                enabled = enabled and torch.amp.GradScaler(device.type).is_enabled()
        except RuntimeError as error:  # an unknown device type, bf16 on a GPU without it
            enabled, caught = False, [warnings.WarningMessage(str(error), RuntimeWarning, "", 0)]
    if not enabled:
        said = " ".join(str(w.message).splitlines()[0] for w in caught)
        raise DistillError(
            f"train.precision {precision} cannot run on device {device.type!r} with torch {torch.__version__} "
            f"({said or 'autocast is off there'}); choose another precision (fp32 runs everywhere) or device"
        )
    return dtype


def autocast(device: torch.device, dtype: torch.dtype | None) -> Any:
    """The student's forward context: autocast to `dtype`, or a context that changes nothing when None (entering
    and leaving a disabled `torch.autocast` took some 1 % of a small classifier's step)."""
    return nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


def gradient_scaler(device: torch.device, precision: str) -> torch.amp.GradScaler:
    """A gradient scaler, enabled for fp16 only (disabled, its calls pass the loss and the step through)."""
    return torch.amp.GradScaler(device.type, enabled=precision == "fp16")


@contextmanager
def activation_checkpointing(model: nn.Module, enabled: bool) -> Iterator[None]:
    """Inside, a Hugging Face `model` recomputes its blocks' activations in the backward pass (and does not build
    a generation cache while training: `config.use_cache` false); both are restored on exit, so the trained model
    is saved and served as it came. Models without gradient checkpointing (the built-in MLP and CNN, whose
    activations are a few vectors per row) are refused: the setting would otherwise change nothing."""
    if not enabled:
        yield
        return
    hf: Any = model
    # transformers 5 names it activation_checkpointing_enable; gradient_checkpointing_enable before (and deprecated)
    prefix = "activation" if callable(getattr(hf, "activation_checkpointing_enable", None)) else "gradient"
    if not callable(getattr(hf, f"{prefix}_checkpointing_enable", None)) or not getattr(
        hf, "supports_gradient_checkpointing", False
    ):
        raise DistillError(
            f"train.activation_checkpointing needs a Hugging Face transformer that supports gradient "
            f"checkpointing; {type(model).__name__} does not (the built-in MLP and CNN keep little activation "
            "memory): set it to false"
        )
    config: Any = getattr(hf, "config", None)
    use_cache = getattr(config, "use_cache", None)
    options = {f"{prefix}_checkpointing_kwargs": {"use_reentrant": False}}
    getattr(hf, f"{prefix}_checkpointing_enable")(**options)
    if use_cache is not None:
        config.use_cache = False
    try:
        yield
    finally:
        getattr(hf, f"{prefix}_checkpointing_disable")()
        if use_cache is not None:
            config.use_cache = use_cache


def teacher_in_precision(teacher: Any, precision: str, teacher_precision: str | None) -> None:
    """Cast the live teachers (the teacher, or an ensemble's members: those with a `cast`, as `LocalTeacher`) to
    `teacher_precision`, else to the student's `precision` when that is not fp32 (an fp32 run leaves them as
    given). A teacher of stored or served log-probs has no precision to set: naming one for it is refused."""
    members = getattr(teacher, "members", [teacher])
    live = [m for m in members if callable(getattr(m, "cast", None))]
    if teacher_precision is not None and not live:
        raise DistillError(
            f"train.teacher_precision is {teacher_precision} but the run has no live teacher to run in it "
            f"(its teacher: {type(teacher).__name__}); leave it unset"
        )
    if teacher_precision is None and precision == "fp32":
        return  # the default: the teacher computes as it was given
    for member in live:
        member.cast(teacher_precision or precision)
