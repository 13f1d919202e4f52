"""The one training loop: AdamW, a warm-up schedule, named loss terms, evaluation, checkpoints and resume.

Every kind of run goes through `train`: a student alone (hard labels only), a student taught by a teacher (soft
targets, optionally mixed with hard labels). The loss is a dict of named terms with weights, so logs and reports
iterate over it.

Resume: a checkpoint holds the model, optimizer, schedule, position in the epoch, running loss sums, history and
the random-number state. Batches are ordered by (seed, epoch), so a run killed at any point and resumed from its
last checkpoint ends with exactly the metrics of an uninterrupted run.
"""

from __future__ import annotations

import math
import os
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from distill.config import LossConfig, TrainConfig
from distill.data import Dataset, check_labels, epoch_order
from distill.errors import DistillError, NonFiniteLossError, ShapeMismatchError
from distill.features import FeatureDistiller, capture
from distill.losses import hard_label_ce, hinton_terms
from distill.progress import NULL, Cancelled, Reporter
from distill.teachers import Teacher
from distill.teachers.local import logits_of, run_model, to_device

CHECKPOINT = "checkpoint.pt"
Evaluate = Callable[[nn.Module], dict[str, float]]


@dataclass
class TrainResult:
    """The trained model and what happened: one history record per epoch (mean loss terms + evaluation)."""

    model: nn.Module
    history: list[dict[str, float]] = field(default_factory=list)
    steps: int = 0
    seconds: float = 0.0

    @property
    def final(self) -> dict[str, float]:
        return self.history[-1] if self.history else {}


def make_optimizer(modules: Sequence[nn.Module], config: TrainConfig) -> torch.optim.Optimizer:
    """AdamW with weight decay on matrices and convolution kernels only (not on biases, norms or embeddings' rows)."""
    parameters = [p for m in modules for p in m.parameters() if p.requires_grad]
    decay = [p for p in parameters if p.dim() >= 2]
    no_decay = [p for p in parameters if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=config.lr)


def make_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig, total_steps: int) -> Any:
    """onecycle (Smith 2018), linear warm-up + cosine decay to zero, or warm-up + constant."""
    if config.schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=config.lr, total_steps=max(total_steps, 1), pct_start=max(config.warmup, 1e-3)
        )
    warmup = int(config.warmup * total_steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if config.schedule == "constant":
            return 1.0
        progress = (step - warmup) / max(total_steps - warmup, 1)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def loss_terms(
    model: nn.Module,
    batch: dict[str, Any],
    teacher: Teacher | None,
    loss: LossConfig,
    features: FeatureDistiller | None = None,
) -> tuple[dict[str, Tensor], dict[str, float]]:
    """The named loss terms of one batch and their weights in the total.

    Logit terms (`loss.logits`): `ce` alone without a teacher, else Hinton's `kd` (weight alpha) and `ce` (1 - alpha),
    over all positions of the output (rows, or tokens of a sequence). Feature terms: one per `loss.features` pair,
    named `kind:student_module`, weighted as configured.
    """
    with capture(model, features.student_hooks if features is not None else []) as captured:
        output = run_model(model, batch["inputs"])
    labels = batch.get("labels")
    output_of_teacher = teacher(batch) if teacher is not None else None
    terms: dict[str, Tensor] = {}
    weights: dict[str, float] = {}
    if loss.logits:
        logits = logits_of(output)
        student_logits = logits.reshape(-1, logits.shape[-1])  # (N, C): rows, or every token position
        flat_labels = labels.reshape(-1) if labels is not None else None  # (N,)
        if output_of_teacher is None:
            if flat_labels is None:
                raise DistillError("training without a teacher needs labels")
            terms["ce"], weights["ce"] = hard_label_ce(student_logits, flat_labels), 1.0
        else:
            if output_of_teacher.logprobs is None:
                raise DistillError("the teacher gives no log-probs; set loss.logits to false to distill features only")
            width = output_of_teacher.logprobs.shape[-1]
            if not output_of_teacher.sparse and width != student_logits.shape[-1]:
                raise ShapeMismatchError(
                    f"the teacher has {width} outputs but the student has {student_logits.shape[-1]}; "
                    "they must predict the same classes"
                )
            ids = output_of_teacher.token_ids
            kd_mask = batch.get("kd_mask")
            logit_terms = hinton_terms(
                student_logits,
                output_of_teacher.logprobs.reshape(-1, width).to(student_logits.device),
                flat_labels,
                temperature=loss.temperature,
                token_ids=None if ids is None else ids.reshape(-1, width).to(student_logits.device),
                teacher_temperature=output_of_teacher.temperature,
                divergence=loss.divergence,
                beta=loss.beta,
                kd_mask=None if kd_mask is None else kd_mask.reshape(-1),
            )
            terms.update(logit_terms)
            weights.update({k: {"kd": loss.alpha, "ce": 1.0 - loss.alpha}[k] for k in logit_terms})
    if features is not None:
        if output_of_teacher is None or output_of_teacher.hidden_states is None:
            raise DistillError("feature distillation needs a live teacher that captures the named modules")
        inputs = batch["inputs"]
        mask = inputs.get("attention_mask") if isinstance(inputs, Mapping) else None
        for pair, (name, value) in zip(
            features.pairs, features(captured, output_of_teacher.hidden_states, mask).items()
        ):
            terms[name], weights[name] = value, pair.weight
    return terms, weights


def _signature(data: Dataset, config: TrainConfig, teacher: Teacher | None, loss: LossConfig) -> dict[str, Any]:
    """What must match for a checkpoint to be resumed by this call."""
    return {
        "rows": len(data),
        "train": config.model_dump(exclude={"checkpoint_every", "eval_every", "device"}),
        "loss": loss.model_dump() if teacher is not None else None,
    }


def _save(path: Path, payload: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)  # atomic: a kill mid-write leaves the previous checkpoint intact


def _rng_state() -> dict[str, Any]:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


def train(
    model: nn.Module,
    data: Dataset,
    config: TrainConfig,
    *,
    teacher: Teacher | None = None,
    loss: LossConfig | None = None,
    evaluate: Evaluate | None = None,
    checkpoint_dir: Path | None = None,
    resume: bool = False,
    reporter: Reporter = NULL,
    name: str = "train",
    features: FeatureDistiller | None = None,
) -> TrainResult:
    """Train `model` on `data`; with a `teacher`, by soft-target distillation (see `distill.losses.hinton_terms`).

    `evaluate(model)` runs at the end of every `config.eval_every` epochs and its figures join the history.
    With `checkpoint_dir`, a checkpoint is written every `config.checkpoint_every` steps and at each epoch's end;
    `resume=True` continues from it (a finished run returns at once).
    """
    loss = loss or LossConfig()
    device = torch.device(config.device)
    model.to(device)
    torch.manual_seed(config.seed)
    labels = getattr(data, "labels", None)
    if teacher is not None and isinstance(labels, Tensor):
        check_labels(labels, teacher.num_classes, "the training data")
    trained = [model] if features is None else [model, features.to(device)]
    optimizer = make_optimizer(trained, config)
    batches_per_epoch = math.ceil(len(data) / config.batch_size)
    total_steps = config.epochs * batches_per_epoch
    scheduler = make_scheduler(optimizer, config, total_steps)
    signature = _signature(data, config, teacher, loss)

    state: dict[str, Any] = {"epoch": 0, "batch": 0, "step": 0, "history": [], "sums": {}, "count": 0, "seconds": 0.0}
    path = Path(checkpoint_dir) / CHECKPOINT if checkpoint_dir is not None else None
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        if resume and path.exists():
            try:
                saved = torch.load(path, map_location=device, weights_only=False)
            except Exception as error:  # a truncated or foreign file
                raise DistillError(f"cannot read checkpoint {path} ({error}); delete it to start over") from None
            if saved.get("signature") != signature:
                raise DistillError(
                    f"checkpoint {path} was written by a run with other data or settings; "
                    "resume with the same config, or delete it to start over"
                )
            model.load_state_dict(saved["model"])
            if features is not None:
                features.load_state_dict(saved["features"])
            optimizer.load_state_dict(saved["optimizer"])
            scheduler.load_state_dict(saved["scheduler"])
            state = saved["state"]
            _set_rng_state(saved["rng"])

    def checkpoint() -> None:
        if path is not None:
            payload = {
                "signature": signature,
                "model": model.state_dict(),
                "features": features.state_dict() if features is not None else None,
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "state": state,
                "rng": _rng_state(),
            }
            _save(path, payload)

    reporter.stage(name, total=total_steps)
    reporter.advance(state["step"])
    started = time.perf_counter() - state["seconds"]
    for epoch in range(state["epoch"], config.epochs):
        order = epoch_order(len(data), config.batch_size, config.seed, epoch, getattr(data, "lengths", None))
        model.train()
        for position in range(state["batch"], len(order)):
            if reporter.cancelled():
                checkpoint()
                raise Cancelled(f"{name} cancelled at step {state['step']}")
            batch = to_device(data.batch(order[position]), device)
            terms, weights = loss_terms(model, batch, teacher, loss, features)
            total = sum(weights[k] * terms[k] for k in terms)
            assert isinstance(total, Tensor)
            value = float(total.detach())
            if not math.isfinite(value):
                detail = ", ".join(f"{k}={float(v.detach()):.4g}" for k, v in terms.items())
                raise NonFiniteLossError(
                    f"{name}: the loss became non-finite at step {state['step'] + 1} (epoch {epoch + 1}; {detail}); "
                    "lower the learning rate or check the inputs for extreme values"
                )
            optimizer.zero_grad(set_to_none=True)
            total.backward()
            if config.grad_clip:
                torch.nn.utils.clip_grad_norm_([p for m in trained for p in m.parameters()], config.grad_clip)
            optimizer.step()
            scheduler.step()
            for key, term in terms.items():
                state["sums"][key] = state["sums"].get(key, 0.0) + float(term.detach())
            state["sums"]["loss"] = state["sums"].get("loss", 0.0) + value
            state["count"] += 1
            state["step"] += 1
            state["batch"] = position + 1
            reporter.advance(1, loss=value)
            if config.checkpoint_every and state["step"] % config.checkpoint_every == 0:
                state["seconds"] = time.perf_counter() - started
                checkpoint()

        record: dict[str, float] = {"epoch": epoch + 1, "step": state["step"]}
        record.update({k: v / max(state["count"], 1) for k, v in state["sums"].items()})
        record["lr"] = float(scheduler.get_last_lr()[0])
        if evaluate is not None and ((epoch + 1) % config.eval_every == 0 or epoch + 1 == config.epochs):
            model.eval()
            record.update(evaluate(model))
            model.train()
        state["history"].append(record)
        reporter.event("epoch", run=name, **record)
        state.update(epoch=epoch + 1, batch=0, sums={}, count=0, seconds=time.perf_counter() - started)
        checkpoint()
    reporter.end()
    model.eval()
    return TrainResult(model=model, history=list(state["history"]), steps=state["step"], seconds=state["seconds"])
