"""Derive a smaller student from a transformer teacher, the DistilBERT way (Sanh et al. 2019).

The student has the teacher's architecture and configuration with fewer layers. With `init="teacher"` it starts
from the teacher's own weights: embeddings, heads and every non-layer weight are copied, and student layer i is a
copy of teacher layer `layers[i]`; by default the layers are spread evenly from the first to the last. A narrower `hidden_size` (or `init="random"`, the ablation) starts from fresh
weights instead. Works for any Hugging Face model whose blocks are one `nn.ModuleList` of `num_hidden_layers`
modules (BERT `encoder.layer`, GPT-2 `transformer.h`, Llama `model.layers`, ...).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Literal

from torch import nn

from distill.errors import DistillError
from distill.models import count_parameters


@dataclass
class Derivation:
    """How a student was made from its teacher."""

    layers: list[int]
    teacher_layers: int
    init: str
    teacher_params: int
    student_params: int
    hidden_size: int

    @property
    def compression(self) -> float:
        return self.teacher_params / self.student_params


def layer_stack(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The name and the module list of a transformer's blocks."""
    count = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    if count is None:
        raise DistillError(f"{type(model).__name__} has no config.num_hidden_layers: not a transformer to derive from")
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == count and name:
            return name, module
    raise DistillError(
        f"cannot find the {count} transformer layers of {type(model).__name__} (no ModuleList of that size)"
    )


def uniform_layers(total: int, keep: int) -> list[int]:
    """`keep` of `total` layers spread evenly from the first to the last (the last is always kept: it produces what
    the head and the pooling read). 6 of 12 -> [0, 2, 4, 7, 9, 11] (DistilBERT's choice), 3 of 6 -> [0, 2, 5],
    1 -> [total - 1]."""
    if not 1 <= keep <= total:
        raise DistillError(f"cannot keep {keep} of {total} layers; choose 1 to {total}")
    if keep == 1:
        return [total - 1]
    return [round(i * (total - 1) / (keep - 1)) for i in range(keep)]


def check_layers(layers: list[int], total: int) -> list[int]:
    if not layers:
        raise DistillError("choose at least one layer to keep")
    for layer in layers:
        if not 0 <= layer < total:
            raise DistillError(f"layer {layer} is out of range: the teacher has {total} layers (0 to {total - 1})")
    if len(set(layers)) != len(layers):
        raise DistillError(f"layers {layers} repeat a layer; each teacher layer can be kept once")
    return sorted(layers)


def derive(
    teacher: nn.Module,
    *,
    layers: list[int] | None = None,
    num_layers: int | None = None,
    hidden_size: int | None = None,
    init: Literal["teacher", "random"] = "teacher",
) -> tuple[nn.Module, Derivation]:
    """A student of the teacher's class with the chosen layers (`layers`, or `num_layers` spread uniformly)."""
    prefix, stack = layer_stack(teacher)
    total = len(stack)
    if layers is None:
        layers = uniform_layers(total, num_layers if num_layers is not None else max(total // 2, 1))
    layers = check_layers(list(layers), total)
    config: Any = copy.deepcopy(teacher.config)
    config.num_hidden_layers = len(layers)
    width = int(getattr(config, "hidden_size", 0))
    narrower = hidden_size is not None and hidden_size != width
    if narrower:
        assert hidden_size is not None
        heads = int(getattr(config, "num_attention_heads", 1))
        if hidden_size % heads:
            raise DistillError(f"hidden_size {hidden_size} must be divisible by the {heads} attention heads")
        if hasattr(config, "intermediate_size"):
            config.intermediate_size = int(config.intermediate_size * hidden_size / width)
        config.hidden_size = hidden_size
        width = hidden_size
    student = type(teacher)(config)
    if init == "teacher" and not narrower:
        state = {}
        for key, value in teacher.state_dict().items():
            if key.startswith(prefix + "."):
                index, rest = key[len(prefix) + 1 :].split(".", 1)
                if int(index) in layers:
                    state[f"{prefix}.{layers.index(int(index))}.{rest}"] = value.clone()
            else:
                state[key] = value.clone()
        student.load_state_dict(state, strict=True)
    info = Derivation(
        layers=layers,
        teacher_layers=total,
        init=init if not narrower else "random (narrower)",
        teacher_params=count_parameters(teacher),
        student_params=count_parameters(student),
        hidden_size=width,
    )
    return student, info
