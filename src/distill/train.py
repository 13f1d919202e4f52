"""The one training loop: AdamW, a warm-up schedule, named loss terms, evaluation, checkpoints and resume.

Every kind of run goes through `train`: a student alone (hard labels only), a student taught by a teacher (soft
targets, optionally mixed with hard labels), on-policy (GKD) and feature distillation as branches of the same step.
The loss is a dict of named terms with weights, so logs and reports iterate over it.

`train` reads as its steps: `_prepare` (inputs checked, the model on its device and wrapped for the processes by
`distill.distributed`, optimizer, schedule), `_resume`, then per epoch `_train_epoch` (one `_step` per batch: forward,
backward, clipping, optimizer) and `_end_epoch` (means over processes, evaluation, history, checkpoint).

Resume: a checkpoint holds the model, optimizer, schedule, position in the epoch, running loss sums, history and
the random-number state. Batches are ordered by (seed, epoch), so a run killed at any point and resumed from its
last checkpoint ends with exactly the metrics of an uninterrupted run.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from distill import distributed
from distill.config import LossConfig, TrainConfig
from distill.data import Dataset, check_labels, epoch_order
from distill.errors import DistillError, NonFiniteLossError, ShapeMismatchError
from distill.features import FeatureDistiller, capture
from distill.lm import is_causal_lm, lm_terms, on_policy_step, student_samples
from distill.losses import hard_label_ce, hinton_terms, hinton_weights, weighted_total
from distill.progress import NULL, Cancelled, Reporter
from distill.teachers import Teacher, TeacherOutput
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
    state_dict: dict[str, Tensor] | None = None  # the full weights of a model sharded by FSDP (on every process)

    @property
    def final(self) -> dict[str, float]:
        return self.history[-1] if self.history else {}


def make_optimizer(modules: Sequence[nn.Module], config: TrainConfig) -> torch.optim.Optimizer:
    """AdamW with weight decay on matrices and convolution kernels only (not on biases, norms or embeddings' rows)."""
    parameters = [p for m in modules for p in m.parameters() if p.requires_grad]
    decay = [p for p in parameters if p.dim() >= 2]
    no_decay = [p for p in parameters if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=config.lr, foreach=True)


def make_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig, total_steps: int) -> Any:
    """onecycle (Smith 2018), linear warm-up + cosine decay to zero, or warm-up + constant."""
    if config.schedule == "onecycle":
        steps = max(total_steps, 4)  # each of its two phases needs a step or more (short runs: tiny data)
        warmup_share = min(max(config.warmup, 2.0 / steps), 0.5)
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=config.lr, total_steps=steps, pct_start=warmup_share
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


# ----------------------------------------------------------------------------------------------------------------
# The loss of one batch: named terms and their weights
# ----------------------------------------------------------------------------------------------------------------


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
    if loss.logits and features is None and "kd_mask" in batch and loss.chunk_size and is_causal_lm(model):
        return lm_terms(model, batch, teacher, loss)
    with capture(model, features.student_hooks if features is not None else []) as captured:
        output = run_model(model, batch["inputs"])
    taught = teacher(batch) if teacher is not None else None
    terms: dict[str, Tensor] = {}
    weights: dict[str, float] = {}
    if loss.logits:
        terms, weights = _logit_terms(logits_of(output), batch, taught, loss)
    if features is not None:
        if taught is None or taught.hidden_states is None:
            raise DistillError("feature distillation needs a live teacher that captures the named modules")
        inputs = batch["inputs"]
        mask = inputs.get("attention_mask") if isinstance(inputs, Mapping) else None
        for pair, (name, value) in zip(features.pairs, features(captured, taught.hidden_states, mask).items()):
            terms[name], weights[name] = value, pair.weight
    return terms, weights


def _logit_terms(
    logits: Tensor, batch: dict[str, Any], taught: TeacherOutput | None, loss: LossConfig
) -> tuple[dict[str, Tensor], dict[str, float]]:
    """`ce` without a teacher; Hinton's `kd` and `ce` (on the rows that have a label) with one."""
    student_logits = logits.reshape(-1, logits.shape[-1])  # (N, C): rows, or every token position
    labels = batch.get("labels")
    flat_labels = labels.reshape(-1) if labels is not None else None  # (N,)
    if taught is None:
        if flat_labels is None:
            raise DistillError("training without a teacher needs labels")
        return {"ce": hard_label_ce(student_logits, flat_labels)}, {"ce": 1.0}
    if taught.logprobs is None:
        raise DistillError("the teacher gives no log-probs; set loss.logits to false to distill features only")
    width = taught.logprobs.shape[-1]
    if not taught.sparse and width != student_logits.shape[-1]:
        raise ShapeMismatchError(
            f"the teacher has {width} outputs but the student has {student_logits.shape[-1]}; "
            "they must predict the same classes"
        )
    device = student_logits.device
    ids = taught.token_ids
    terms = hinton_terms(
        student_logits,
        taught.logprobs.reshape(-1, width).to(device),  # (N, C), or (N, K) when sparse
        flat_labels,
        temperature=loss.temperature,
        token_ids=None if ids is None else ids.reshape(-1, width).to(device),  # (N, K)
        teacher_temperature=taught.temperature,
        divergence=loss.divergence,
        beta=loss.beta,
        kd_mask=_kd_mask(batch, taught, device),
    )
    return terms, hinton_weights(loss.alpha, terms)


def _kd_mask(batch: dict[str, Any], taught: TeacherOutput, device: torch.device) -> Tensor | None:
    """(N,) the positions the divergence counts: the batch's `kd_mask` (scored tokens) and the positions the teacher
    has a distribution for (`TeacherOutput.mask`); None = all."""
    kd_mask = batch.get("kd_mask")
    if taught.mask is not None:  # positions the teacher has no distribution for weigh 0
        covered = taught.mask.to(device)
        kd_mask = covered if kd_mask is None else kd_mask & covered
    return None if kd_mask is None else kd_mask.reshape(-1)


# ----------------------------------------------------------------------------------------------------------------
# The run, in named steps: set-up and distribution, epochs, one optimisation step
# ----------------------------------------------------------------------------------------------------------------


def _fresh_state() -> dict[str, Any]:
    """Where a run stands: what a checkpoint holds besides the weights, optimizer and schedule."""
    return {"epoch": 0, "batch": 0, "step": 0, "history": [], "sums": {}, "count": 0, "seconds": 0.0}


@dataclass
class _Run:
    """One call of `train`: what its steps share."""

    name: str
    model: nn.Module  # as given
    net: nn.Module  # the same model as trained: wrapped for DDP (or sharded by FSDP) under torchrun
    data: Dataset
    config: TrainConfig
    loss: LossConfig
    teacher: Teacher | None
    features: FeatureDistiller | None
    optimizer: torch.optim.Optimizer
    scheduler: Any
    reporter: Reporter
    device: torch.device
    rank: int
    world: int
    batches_per_epoch: int  # per process
    signature: dict[str, Any]  # what a checkpoint must match to be resumed
    path: Path | None  # the checkpoint file
    state: dict[str, Any] = field(default_factory=_fresh_state)
    started: float = 0.0  # perf_counter() at the run's start, earlier by the seconds of the run it resumes

    @property
    def trained(self) -> list[nn.Module]:
        return [self.model] if self.features is None else [self.model, self.features]


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
    `resume=True` continues from it (a finished run returns at once). Under torchrun every process trains its share
    of each epoch's batches and process 0 reports and writes.
    """
    run = _prepare(model, data, config, teacher, loss or LossConfig(), features, reporter, name, checkpoint_dir)
    if resume:
        _resume(run)
    run.reporter.stage(name, total=config.epochs * run.batches_per_epoch)
    run.reporter.advance(run.state["step"])
    run.started = time.perf_counter() - run.state["seconds"]
    for epoch in range(run.state["epoch"], config.epochs):
        _train_epoch(run, epoch)
        _end_epoch(run, epoch, evaluate)
    run.reporter.end()
    model.eval()
    sharded = distributed.sharded(config.strategy)
    full = distributed.full_state(model, run.optimizer, config.strategy)[0] if sharded else None
    state = run.state
    return TrainResult(
        model=model, history=list(state["history"]), steps=state["step"], seconds=state["seconds"], state_dict=full
    )


def _prepare(
    model: nn.Module,
    data: Dataset,
    config: TrainConfig,
    teacher: Teacher | None,
    loss: LossConfig,
    features: FeatureDistiller | None,
    reporter: Reporter,
    name: str,
    checkpoint_dir: Path | None,
) -> _Run:
    """The run set up: inputs checked, the model on its device and wrapped for the processes (distribution), the
    optimizer and the schedule."""
    device = torch.device(config.device)
    model.to(device)
    rank, world = distributed.rank(), distributed.world_size()
    batches_per_epoch = _check(data, config, teacher, loss, name, world)
    net = distributed.wrap(model, device, config.strategy)  # before the optimizer: FSDP replaces the parameters
    trained = [model] if features is None else [model, features.to(device)]
    optimizer = make_optimizer(trained, config)
    scheduler = make_scheduler(optimizer, config, config.epochs * batches_per_epoch)
    path = Path(checkpoint_dir) / CHECKPOINT if checkpoint_dir is not None else None
    if path is not None and rank == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
    return _Run(
        name=name, model=model, net=net, data=data, config=config, loss=loss, teacher=teacher, features=features,
        optimizer=optimizer, scheduler=scheduler, reporter=reporter if rank == 0 else NULL,  # one process reports
        device=device, rank=rank, world=world, batches_per_epoch=batches_per_epoch,
        signature=_signature(data, config, teacher, loss) | {"processes": world}, path=path,
    )  # fmt: skip


def _check(data: Dataset, config: TrainConfig, teacher: Teacher | None, loss: LossConfig, name: str, world: int) -> int:
    """The number of batches each process trains on per epoch, after checking that the run can start."""
    if loss.lmbda > 0 and (
        teacher is None or not hasattr(teacher, "model") or "prompt_lengths" not in data.batch(torch.arange(1))
    ):
        raise DistillError(
            "on-policy distillation (lmbda > 0) needs a live teacher model and prompt/completion data: a cache "
            "cannot score the student's own samples"
        )
    if len(data) == 0:
        raise DistillError(f"{name}: the training data has no rows")
    labels = getattr(data, "labels", None)
    if teacher is not None and isinstance(labels, Tensor):
        check_labels(labels, teacher.num_classes, "the training data")
    lengths = getattr(data, "lengths", None)
    batches_per_epoch = len(epoch_order(len(data), config.batch_size, config.seed, 0, lengths)) // world
    if batches_per_epoch == 0:
        raise DistillError(f"{len(data)} rows make fewer batches than the {world} processes training on them")
    return batches_per_epoch


def _train_epoch(run: _Run, epoch: int) -> None:
    """The steps of one epoch from where the run stands, each process on its share of the epoch's batches."""
    config, state = run.config, run.state
    order = epoch_order(len(run.data), config.batch_size, config.seed, epoch, getattr(run.data, "lengths", None))
    mine = order[run.rank : run.batches_per_epoch * run.world : run.world]  # every process its share, same count
    run.net.train()
    for position in range(state["batch"], len(mine)):
        if run.reporter.cancelled():
            _save_checkpoint(run)
            raise Cancelled(f"{run.name} cancelled at step {state['step']}")
        # Dropout and sampling draw from a generator fixed by (seed, step, process): a resumed run redraws them.
        torch.manual_seed(config.seed * 1_000_003 + state["step"] * run.world + run.rank)
        batch = to_device(run.data.batch(mine[position]), run.device)
        terms, value = _step(run, batch, epoch)
        for key, term in terms.items():
            state["sums"][key] = state["sums"].get(key, 0.0) + float(term.detach())
        state["sums"]["loss"] = state["sums"].get("loss", 0.0) + value
        state["count"] += 1
        state["step"] += 1
        state["batch"] = position + 1
        run.reporter.advance(1, loss=value)
        if config.checkpoint_every and state["step"] % config.checkpoint_every == 0:
            state["seconds"] = time.perf_counter() - run.started
            _save_checkpoint(run)


def _step(run: _Run, batch: dict[str, Any], epoch: int) -> tuple[dict[str, Tensor], float]:
    """One optimisation step: forward (the loss terms), their weighted total, backward, gradient clipping, the
    optimizer and the schedule. Returns the terms and the total's value.

    The one place where a step's arithmetic is decided: mixed precision (autocast, gradient scaling) and gradient
    accumulation belong here."""
    terms, weights = _forward(run, batch)
    total = weighted_total(terms, weights)
    value = float(total.detach())
    if not math.isfinite(value):
        detail = ", ".join(f"{k}={float(v.detach()):.4g}" for k, v in terms.items())
        raise NonFiniteLossError(
            f"{run.name}: the loss became non-finite at step {run.state['step'] + 1} (epoch {epoch + 1}; {detail}); "
            "lower the learning rate or check the inputs for extreme values"
        )
    run.optimizer.zero_grad(set_to_none=True)
    total.backward()
    if run.features is not None:  # the projections are not inside the DDP wrapper
        distributed.average_gradients(run.features.parameters())
    if run.config.grad_clip:
        torch.nn.utils.clip_grad_norm_([p for m in run.trained for p in m.parameters()], run.config.grad_clip)
    run.optimizer.step()
    run.scheduler.step()
    return terms, value


def _forward(run: _Run, batch: dict[str, Any]) -> tuple[dict[str, Tensor], dict[str, float]]:
    """The loss terms of one batch and their weights: on an on-policy step (GKD) on the student's own completions of
    the batch's prompts, otherwise on the batch."""
    config, loss, step = run.config, run.loss, run.state["step"]
    if not on_policy_step(config.seed, step, loss.lmbda):
        return loss_terms(run.net, batch, run.teacher, loss, run.features)
    sampled = student_samples(
        run.net, batch, max_new_tokens=loss.max_new_tokens, temperature=loss.sample_temperature,
        seed=config.seed * 7919 + step * run.world + run.rank, pad_id=getattr(run.data, "pad_id", 0),
        eos_id=getattr(getattr(run.model, "config", None), "eos_token_id", None),
    )  # fmt: skip
    return lm_terms(run.net, sampled, run.teacher, loss, on_policy=True)


def _end_epoch(run: _Run, epoch: int, evaluate: Evaluate | None) -> None:
    """The epoch's record (mean loss terms over all processes, learning rate, evaluation when due) into the history,
    reported, and a checkpoint."""
    state = run.state
    record: dict[str, float] = {"epoch": epoch + 1, "step": state["step"]}
    record.update(distributed.mean_over_processes(state["sums"], state["count"]))
    record["lr"] = float(run.scheduler.get_last_lr()[0])
    due = (epoch + 1) % run.config.eval_every == 0 or epoch + 1 == run.config.epochs
    # every process takes part in a sharded model's forward
    if evaluate is not None and due and (run.rank == 0 or distributed.sharded(run.config.strategy)):
        run.model.eval()
        record.update(plain(evaluate(run.model)))
        run.model.train()
    state["history"].append(record)
    run.reporter.event("epoch", run=run.name, **record)
    state.update(epoch=epoch + 1, batch=0, sums={}, count=0, seconds=time.perf_counter() - run.started)
    _save_checkpoint(run)


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints: resume exactly where a killed run stopped
# ----------------------------------------------------------------------------------------------------------------


def _signature(data: Dataset, config: TrainConfig, teacher: Teacher | None, loss: LossConfig) -> dict[str, Any]:
    """What must match for a checkpoint to be resumed by this call."""
    return {
        "rows": len(data),
        "train": config.model_dump(exclude={"checkpoint_every", "eval_every", "device"}),
        "loss": loss.model_dump() if teacher is not None else None,
    }


def plain(value: Any) -> Any:
    """`value` with numpy scalars and arrays made Python numbers and lists (dicts, lists and tuples walked; tensors
    and plain values kept): what a checkpoint holds must load with `torch.load(weights_only=True)`."""
    if isinstance(value, dict):
        return {key: plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(plain(item) for item in value)
    if isinstance(value, (np.generic, np.ndarray)):
        return value.tolist()
    return value


def _load_checkpoint(path: Path, device: torch.device) -> dict[str, Any]:
    """A checkpoint written by `train`, loaded with `weights_only=True`: tensors and plain data only, so a crafted
    file cannot run code; anything else is a DistillError."""
    try:
        saved = torch.load(path, map_location=device, weights_only=True)
    except Exception:  # a truncated, foreign or crafted file (pickle, zip and torch raise many types)
        raise DistillError(
            f"cannot read checkpoint {path}: it is not a distill checkpoint of tensors and plain data (nothing in it "
            "was run); delete it to start over"
        ) from None
    if not isinstance(saved, dict) or not {"signature", "model", "optimizer", "scheduler", "state"} <= set(saved):
        raise DistillError(f"cannot read checkpoint {path}: it is not a distill checkpoint; delete it to start over")
    return saved


def _save(path: Path, payload: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)  # atomic: a kill mid-write leaves the previous checkpoint intact


def _resume(run: _Run) -> None:
    """Continue from the run's checkpoint when there is one (a finished run's says that no epoch is left)."""
    if run.path is None or not run.path.exists():
        return
    saved = _load_checkpoint(run.path, run.device)
    if saved["signature"] != run.signature:
        raise DistillError(
            f"checkpoint {run.path} was written by a run with other data or settings; "
            "resume with the same config, or delete it to start over"
        )
    distributed.load_full_state(run.model, run.optimizer, saved["model"], saved["optimizer"], run.config.strategy)
    if run.features is not None:
        run.features.load_state_dict(saved["features"])
    run.scheduler.load_state_dict(saved["scheduler"])
    run.state = saved["state"]


def _save_checkpoint(run: _Run) -> None:
    """Write the checkpoint (process 0; the state is gathered by all under FSDP) and wait for every process."""
    if run.path is None:
        return
    model_state, optimizer_state = distributed.full_state(run.model, run.optimizer, run.config.strategy)
    if run.rank == 0:
        payload = {
            "signature": plain(run.signature),
            "model": model_state,  # torch's own state dicts: tensors and plain data already
            "features": run.features.state_dict() if run.features is not None else None,
            "optimizer": optimizer_state,
            "scheduler": plain(run.scheduler.state_dict()),
            "state": plain(run.state),
        }
        _save(run.path, payload)
    distributed.barrier()
