"""Built-in model families for array data (MLP, 1-D CNN, 2-D CNN) and saving/loading them.

A saved model is a directory with `model.safetensors` (the weights) and `model.json` (family, hyper-parameters,
input shape and number of classes), so a teacher trained in one run can teach in another without pickles or code.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from distill.config import MAX_CLASSES, MAX_LENGTH, MAX_MODEL_PARAMETERS, ModelSpec
from distill.data import read_json
from distill.errors import DistillError

WEIGHTS = "model.safetensors"
SPEC = "model.json"


class MLP(nn.Module):
    """Flatten, then `depth` hidden layers of `width` units with ReLU, then a linear classifier."""

    def __init__(self, in_features: int, num_classes: int, width: int, depth: int, dropout: float = 0.0):
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        size = in_features
        for _ in range(depth):
            layers += [nn.Linear(size, width), nn.ReLU()]
            if dropout:
                layers.append(nn.Dropout(dropout))
            size = width
        layers.append(nn.Linear(size, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:  # (B, *input_shape) -> (B, C)
        return self.net(x)


class CNN1d(nn.Module):
    """A 1-D CNN: a wide first convolution, two stride-2 convolutions, `depth - 3` more, an optional hidden head."""

    def __init__(self, length: int, num_classes: int, width: int, depth: int, dropout: float = 0.0, head: int = 0):
        super().__init__()
        depth = max(depth, 3)
        layers: list[nn.Module] = [nn.Conv1d(1, width, 5, padding=2), nn.GELU()]
        out_len = length
        for i in range(depth - 1):
            stride = 2 if i < 2 else 1
            layers += [nn.Conv1d(width, width, 3, padding=1, stride=stride), nn.GELU()]
            out_len = (out_len - 1) // stride + 1
        self.features = nn.Sequential(*layers)
        self.head = _head(width * out_len, num_classes, head, dropout)

    def forward(self, x: Tensor) -> Tensor:  # (B, L) -> (B, C)
        return self.head(self.features(x.unsqueeze(1)))  # (B, 1, L) -> (B, W, L') -> (B, C)


class CNN2d(nn.Module):
    """A small 2-D CNN for images: `depth` 3x3 convolution blocks, the second and third with stride 2."""

    def __init__(
        self, shape: tuple[int, int], num_classes: int, width: int, depth: int, dropout: float = 0.0, head: int = 0
    ):
        super().__init__()
        layers: list[nn.Module] = []
        channels, (h, w) = 1, shape
        for i in range(depth):
            stride = 2 if i in (1, 2) else 1
            layers += [nn.Conv2d(channels, width, 3, padding=1, stride=stride), nn.GELU()]
            channels = width
            h, w = (h - 1) // stride + 1, (w - 1) // stride + 1
        self.features = nn.Sequential(*layers)
        self.head = _head(width * h * w, num_classes, head, dropout)

    def forward(self, x: Tensor) -> Tensor:  # (B, H, W) -> (B, C)
        return self.head(self.features(x.unsqueeze(1)))  # (B, 1, H, W) -> (B, W', h, w) -> (B, C)


def _head(features: int, num_classes: int, hidden: int, dropout: float) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Flatten(), nn.Dropout(dropout)]
    if hidden:
        layers += [nn.Linear(features, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, num_classes)]
    else:
        layers.append(nn.Linear(features, num_classes))
    return nn.Sequential(*layers)


def _mlp(spec: ModelSpec, shape: tuple[int, ...], classes: int) -> nn.Module:
    return MLP(math.prod(shape), classes, spec.width, spec.depth, spec.dropout)


def _cnn1d(spec: ModelSpec, shape: tuple[int, ...], classes: int) -> nn.Module:
    if len(shape) != 1:
        raise DistillError(f"family cnn1d needs 1-D inputs (length,), but the data has shape {shape}")
    return CNN1d(shape[0], classes, spec.width, spec.depth, spec.dropout, spec.head)


def _cnn2d(spec: ModelSpec, shape: tuple[int, ...], classes: int) -> nn.Module:
    if len(shape) != 2:
        raise DistillError(
            f"family cnn2d needs 2-D inputs (height, width), but the data has shape {shape}; "
            "set data.input_shape, for example [8, 8]"
        )
    return CNN2d((shape[0], shape[1]), classes, spec.width, spec.depth, spec.dropout, spec.head)


FAMILIES: dict[str, Callable[[ModelSpec, tuple[int, ...], int], nn.Module]] = {
    "mlp": _mlp,
    "cnn1d": _cnn1d,
    "cnn2d": _cnn2d,
}


def build(spec: ModelSpec, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """A fresh model of `spec.family` for inputs of `input_shape` (without the batch) and `num_classes` outputs.

    The model is first laid out on the meta device (no memory, no random draws): one that would hold more than
    MAX_MODEL_PARAMETERS parameters is a DistillError before anything is allocated.
    """
    shape = tuple(input_shape)
    with torch.device("meta"):
        size = count_parameters(FAMILIES[spec.family](spec, shape, num_classes))
    if size > MAX_MODEL_PARAMETERS:
        raise DistillError(
            f"a {spec.family} of width {spec.width} and depth {spec.depth} for inputs of shape {list(shape)} and "
            f"{num_classes:,} classes would hold {size:,} parameters, over the limit of {MAX_MODEL_PARAMETERS:,}"
        )
    return FAMILIES[spec.family](spec, shape, num_classes)


def count_parameters(model: nn.Module) -> int:
    """Number of parameters (each shared tensor counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def save(model: nn.Module, directory: Path, spec: ModelSpec, input_shape: tuple[int, ...], num_classes: int) -> Path:
    """Write `model.safetensors` and `model.json` into `directory`; return the weights file."""
    directory.mkdir(parents=True, exist_ok=True)
    weights = directory / WEIGHTS
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(weights))
    meta: dict[str, Any] = {
        "format": "distill-model",
        "spec": spec.model_dump(),
        "input_shape": list(input_shape),
        "num_classes": num_classes,
        "parameters": count_parameters(model),
    }
    (directory / SPEC).write_text(json.dumps(meta, indent=2))
    return weights


def load(directory: Path) -> tuple[nn.Module, ModelSpec, tuple[int, ...], int]:
    """Load a model saved by `save`: (model in eval mode, spec, input shape, number of classes)."""
    directory = Path(directory)
    if not (directory / SPEC).is_file() or not (directory / WEIGHTS).is_file():
        raise DistillError(f"{directory} is not a saved distill model (expected {SPEC} and {WEIGHTS} inside)")
    meta = read_json(directory / SPEC)
    try:
        spec = ModelSpec.model_validate(meta["spec"])
        shape = tuple(int(s) for s in meta["input_shape"])
        classes = int(meta["num_classes"])
    except (ValueError, KeyError, TypeError) as error:
        raise DistillError(f"{directory / SPEC} is malformed ({str(error).splitlines()[0]})") from None
    if not 1 <= classes <= MAX_CLASSES or not 1 <= len(shape) <= 4 or not all(1 <= n <= MAX_LENGTH for n in shape):
        raise DistillError(
            f"{directory / SPEC} is malformed: {classes:,} classes (1..{MAX_CLASSES:,}) for inputs of shape "
            f"{list(shape)} (1 to 4 sizes, each 1..{MAX_LENGTH:,})"
        )
    model = build(spec, shape, classes)
    try:
        model.load_state_dict(load_file(str(directory / WEIGHTS)))
    except Exception as error:  # safetensors raises several types for truncated or foreign files
        raise DistillError(f"cannot load weights from {directory / WEIGHTS}: {str(error).splitlines()[0]}") from None
    return model.eval(), spec, shape, classes
