"""The Python API: `distill.distill(teacher, student, data)` for any pair of `torch.nn.Module`s.

    import distill
    result = distill.distill(teacher, student, (x_train, y_train), transfer=x_unlabeled, test=(x_test, y_test))
    result.model, result.history

The teacher may be a module, a list of modules (an ensemble) or any `distill.teachers.Teacher`. Its outputs are
computed once into a cache when `cache_dir` is given (every epoch then reads them), otherwise live per batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor, nn

from distill import evaluate
from distill.config import LossConfig, TrainConfig
from distill.data import IGNORE, ArrayDataset, concat
from distill.errors import DataError, ShapeMismatchError
from distill.progress import NULL, Reporter
from distill.teachers import EnsembleTeacher, LocalTeacher, Teacher, build_cache
from distill.teachers.local import fingerprint, logits_of
from distill.train import Evaluate, TrainResult, train


def _as_dataset(data: ArrayDataset | tuple[Tensor, Tensor], name: str) -> ArrayDataset:
    if isinstance(data, ArrayDataset):
        return data
    if not isinstance(data, (tuple, list)) or len(data) != 2:
        raise DataError(f"{name} must be an ArrayDataset or a pair (inputs, labels)")
    inputs, labels = data
    return ArrayDataset(torch.as_tensor(inputs), torch.as_tensor(labels))


def _output_width(model: nn.Module, example: Tensor) -> int:
    was_training = model.training
    model.eval()
    with torch.no_grad():
        width = int(logits_of(model(example[:1])).shape[-1])
    model.train(was_training)
    return width


def _as_teacher(
    teacher: nn.Module | Sequence[nn.Module] | Teacher, inputs: Tensor, ensemble: Literal["mean", "geometric"]
) -> tuple[Teacher, str]:
    """The teacher as a `Teacher`, and an id of its weights for the cache ("" when it has none: not cached)."""
    if isinstance(teacher, nn.Module):
        return LocalTeacher(teacher, _output_width(teacher, inputs)), fingerprint(teacher)
    if isinstance(teacher, (list, tuple)):
        members = [LocalTeacher(m, _output_width(m, inputs)) for m in teacher]
        return EnsembleTeacher(members, mode=ensemble), ensemble + "".join(fingerprint(m) for m in teacher)
    return teacher, ""  # type: ignore[return-value]


def _accuracy_on(test_set: ArrayDataset) -> Evaluate:
    def score(model: nn.Module) -> dict[str, float]:
        return {"test_accuracy": evaluate.accuracy(evaluate.predict(model, test_set.inputs), test_set.labels)}

    return score


def distill(
    teacher: nn.Module | Sequence[nn.Module] | Teacher,
    student: nn.Module,
    data: ArrayDataset | tuple[Tensor, Tensor],
    *,
    transfer: Tensor | None = None,
    test: ArrayDataset | tuple[Tensor, Tensor] | None = None,
    temperature: float = 2.0,
    alpha: float = 0.9,
    divergence: Literal["forward_kl", "reverse_kl", "jsd", "tvd"] = "forward_kl",
    epochs: int = 20,
    batch_size: int = 256,
    lr: float = 1e-2,
    weight_decay: float = 0.01,
    seed: int = 0,
    ensemble: Literal["mean", "geometric"] = "mean",
    train_config: TrainConfig | None = None,
    cache_dir: Path | None = None,
    checkpoint_dir: Path | None = None,
    resume: bool = False,
    reporter: Reporter = NULL,
) -> TrainResult:
    """Distill `teacher` into `student` on labeled `data` plus unlabeled `transfer` inputs; return the result.

    Loss: Hinton's mix of the divergence at temperature T and the labels' cross-entropy, weighted by alpha
    (`distill.losses.hinton_terms`, `hinton_weights`; labels only where given).
    `test`, when given, is evaluated after every epoch (`test_accuracy` in the history).

    Training: AdamW at a constant rate `lr`, without warm-up or gradient clipping. Chosen on MNIST-1D and 8x8
    digits, with and without a transfer set (`benchmarks/vs_peers_classification.py` and trial runs of 5 to 20
    epochs, 40 on digits and on MNIST-1D's labeled signals alone): the earlier defaults (one-cycle to 3e-3, clipping
    at norm 1) taught less than a plain loop at a constant 3e-3 at every budget; one-cycle to 1e-2 beat that loop
    but lost to a constant 1e-2 on short budgets and only matched it on long ones; clipping changed nothing Adam
    did (its steps do not depend on the gradient's scale) and cost time. `train_config` replaces them all.
    """
    labeled = _as_dataset(data, "data")
    train_set = labeled
    if transfer is not None:
        transfer_inputs = torch.as_tensor(transfer)
        train_set = concat(labeled, ArrayDataset(transfer_inputs, torch.full((len(transfer_inputs),), IGNORE)))
    student_width = _output_width(student, train_set.inputs)
    source, fingerprint_id = _as_teacher(teacher, train_set.inputs, ensemble)
    if source.num_classes != student_width:
        raise ShapeMismatchError(
            f"the teacher has {source.num_classes} outputs but the student has {student_width}; "
            "they must predict the same classes"
        )
    if cache_dir is not None and fingerprint_id:
        cache = build_cache(
            source, train_set, Path(cache_dir), teacher_id=fingerprint_id, data_id=train_set.fingerprint()
        )
        source = cache.at_temperature(temperature)
    config = train_config or TrainConfig(
        epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=weight_decay, seed=seed,
        schedule="constant", warmup=0.0, grad_clip=None,
    )  # fmt: skip
    return train(
        student,
        train_set,
        config,
        teacher=source,
        loss=LossConfig(divergence=divergence, temperature=temperature, alpha=alpha),
        evaluate=_accuracy_on(_as_dataset(test, "test")) if test is not None else None,
        checkpoint_dir=checkpoint_dir,
        resume=resume,
        reporter=reporter,
        name="distill",
    )
