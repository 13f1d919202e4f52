"""The one training loop: AdamW, a warm-up schedule, named loss terms, evaluation, checkpoints and resume.

Every kind of run goes through `train`: a student alone (hard labels only), a student taught by a teacher (soft
targets, optionally mixed with hard labels), on-policy (GKD) and feature distillation as branches of the same step.
The loss is a dict of named terms with weights (`distill.batch_loss`), so logs and reports iterate over it.

`train` reads as its steps: `_prepare` (inputs checked, the model on its device and wrapped for the processes by
`distill.distributed`, the teacher in its precision, optimizer, schedule), `_resume`, then per epoch `_train_epoch`
(one `_step` per optimizer step: the forward of each micro-batch under autocast, backward, then clipping and the
optimizer) and `_end_epoch` (means over processes, evaluation, history, checkpoint).

Mixed precision, gradient accumulation and activation checkpointing are settings of the same loop
(`train.precision`, `train.grad_accum_steps`, `train.activation_checkpointing`; see `_step` and `distill.compute`).
The schedule, `checkpoint_every` and the history count optimizer steps.

Resume: a checkpoint holds the model, optimizer, schedule, gradient scaler, position in the epoch, running loss
sums, history and the random-number state; it is written between optimizer steps. Batches are ordered by (seed,
epoch), so a run killed at any point and resumed from its last checkpoint ends with exactly the metrics of an
uninterrupted run.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from distill import checkpoints, distributed
from distill.batch_loss import add_units, loss_terms, term_units, unit_of
from distill.checkpoints import CHECKPOINT, plain
from distill.compute import (
    activation_checkpointing,
    autocast,
    autocast_dtype,
    check_device,
    gradient_scaler,
    teacher_in_precision,
)
from distill.config import LossConfig, TrainConfig
from distill.data import Dataset, check_labels, epoch_order
from distill.errors import DistillError, NonFiniteLossError
from distill.features import FeatureDistiller
from distill.lm import lm_terms, on_policy_step, student_samples
from distill.losses import weighted_total
from distill.optim import make_optimizer, make_scheduler, rate_changes
from distill.progress import NULL, Cancelled, Reporter
from distill.teachers import Teacher
from distill.teachers.local import to_device

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


# ----------------------------------------------------------------------------------------------------------------
# The run, in named steps: set-up and distribution, epochs, one optimisation step
# ----------------------------------------------------------------------------------------------------------------


def _fresh_state() -> dict[str, Any]:
    """Where a run stands: what a checkpoint holds besides the weights, optimizer and schedule. `step` counts
    optimizer steps, `batch` the accumulation groups done in the epoch (one optimizer step each)."""
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
    rate_changes: bool  # False: a constant rate, whose schedule is not stepped
    scaler: torch.amp.GradScaler  # enabled for fp16 only
    autocast_dtype: torch.dtype | None  # the student's forward under autocast (None: float32)
    reporter: Reporter
    device: torch.device
    rank: int
    world: int
    batches_per_epoch: int  # optimizer steps (accumulation groups) per epoch and process
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
    With `checkpoint_dir`, a checkpoint is written every `config.checkpoint_every` optimizer steps and at each
    epoch's end; `resume=True` continues from it (a finished run returns at once). Under torchrun every process
    trains its share of each epoch's batches and process 0 reports and writes. `config.precision`,
    `config.grad_accum_steps` and `config.activation_checkpointing`: see `_step` and `distill.compute`.
    """
    run = _prepare(model, data, config, teacher, loss or LossConfig(), features, reporter, name, checkpoint_dir)
    with activation_checkpointing(model, config.activation_checkpointing):
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
    teacher in its precision, the optimizer, the gradient scaler and the schedule."""
    device = check_device(config.device)
    dtype = autocast_dtype(device, config.precision)  # before anything moves: a device that cannot is refused
    rank, world = distributed.rank(), distributed.world_size()
    batches_per_epoch = _check(data, config, teacher, loss, name, world)
    teacher_in_precision(teacher, config.precision, config.teacher_precision)
    model.to(device)
    net = distributed.wrap(model, device, config.strategy)  # before the optimizer: FSDP replaces the parameters
    trained = [model] if features is None else [model, features.to(device)]
    optimizer = make_optimizer(trained, config)
    scheduler = make_scheduler(optimizer, config, config.epochs * batches_per_epoch)
    path = Path(checkpoint_dir) / CHECKPOINT if checkpoint_dir is not None else None
    if path is not None and rank == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
    return _Run(
        name=name, model=model, net=net, data=data, config=config, loss=loss, teacher=teacher, features=features,
        optimizer=optimizer, scheduler=scheduler, rate_changes=rate_changes(config, config.epochs * batches_per_epoch),
        scaler=gradient_scaler(device, config.precision),
        autocast_dtype=dtype, reporter=reporter if rank == 0 else NULL,  # one process reports
        device=device, rank=rank, world=world, batches_per_epoch=batches_per_epoch,
        signature=_signature(data, config, teacher, loss) | {"processes": world}, path=path,
    )  # fmt: skip


def _check(data: Dataset, config: TrainConfig, teacher: Teacher | None, loss: LossConfig, name: str, world: int) -> int:
    """The number of optimizer steps each process takes per epoch, after checking that the run can start."""
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
    groups = len(_epoch_groups(data, config, 0)) // world
    if groups == 0:
        raise DistillError(f"{len(data)} rows make fewer batches than the {world} processes training on them")
    return groups


def _epoch_groups(data: Dataset, config: TrainConfig, epoch: int) -> list[Tensor]:
    """The epoch's accumulation groups: batches of `batch_size x grad_accum_steps` rows in an order fixed by (seed,
    epoch), each split into micro-batches of `batch_size` by `_step` (the last group may be smaller)."""
    size = config.batch_size * config.grad_accum_steps
    return epoch_order(len(data), size, config.seed, epoch, getattr(data, "lengths", None))


def _train_epoch(run: _Run, epoch: int) -> None:
    """The optimizer steps of one epoch from where the run stands, each process on its share of the epoch's
    groups. A cancelled run stops between steps (no gradient is half accumulated) and leaves a checkpoint."""
    config, state = run.config, run.state
    order = _epoch_groups(run.data, config, epoch)
    mine = order[run.rank : run.batches_per_epoch * run.world : run.world]  # every process its share, same count
    run.net.train()
    for position in range(state["batch"], len(mine)):
        if run.reporter.cancelled():
            _save_checkpoint(run)
            raise Cancelled(f"{run.name} cancelled at step {state['step']}")
        terms, value = _step(run, list(mine[position].split(config.batch_size)), epoch)
        for key, term in terms.items():
            state["sums"][key] = state["sums"].get(key, 0.0) + term
        state["sums"]["loss"] = state["sums"].get("loss", 0.0) + value
        state["count"] += 1
        state["step"] += 1
        state["batch"] = position + 1
        run.reporter.advance(1, loss=value)
        if config.checkpoint_every and state["step"] % config.checkpoint_every == 0:
            state["seconds"] = time.perf_counter() - run.started
            _save_checkpoint(run)


def _step(run: _Run, group: list[Tensor], epoch: int) -> tuple[dict[str, float], float]:
    """One optimizer step over the micro-batches of `group` (row indices): for each, the forward under autocast
    (the loss terms), backward of their weighted total (scaled for fp16; under DDP without synchronising the
    gradients but on the last micro-batch); then unscaling, clipping, the optimizer and the schedule. Returns the
    group's terms and total (what one batch of all its rows would give).

    Gradient accumulation: each term of a micro-batch is weighted by its share of the group's units of that term
    (`distill.batch_loss.term_units`: scored tokens for `kd`, labeled rows or tokens for `ce`, rows for feature
    terms), so the summed gradient is that of each term's mean over the whole group: `grad_accum_steps` micro-
    batches of `batch_size` rows give the gradient, the update and the logged loss of one batch of all their rows
    to float rounding, for the classifier and the LM paths alike. Where a teacher lacks some scored positions (a
    partial cache) the kd term of a micro-batch is weighted by its scored tokens, not by the covered ones.
    Without accumulation every share is 1: the step is the plain one."""
    micro = _micro_batches(run, group)
    units = [term_units(batch, sampled) for batch, sampled in micro] if len(micro) > 1 else None
    totals = add_units(units) if units is not None else {}
    run.optimizer.zero_grad(set_to_none=True)
    terms_sum: dict[str, float] = {}
    value = 0.0
    for j, (batch, sampled) in enumerate(micro):
        _seed_micro_batch(run, j)
        with distributed.gradient_sync(run.net, j == len(micro) - 1):
            with autocast(run.device, run.autocast_dtype):
                terms, weights = _forward(run, batch, sampled, fused=units is None)
            shares = _shares(terms, units, totals, j)
            total = weighted_total(terms, {k: weights[k] * shares[k] for k in terms})
            value += _check_finite(run, terms, total, epoch)
            run.scaler.scale(total).backward()
        for key, term in terms.items():
            terms_sum[key] = terms_sum.get(key, 0.0) + shares[key] * float(term.detach())
    if run.features is not None:  # the projections are not inside the DDP wrapper
        distributed.average_gradients(run.features.parameters())
    if run.config.grad_clip:
        run.scaler.unscale_(run.optimizer)
        torch.nn.utils.clip_grad_norm_([p for m in run.trained for p in m.parameters()], run.config.grad_clip)
    run.scaler.step(run.optimizer)  # fp16: skipped when a gradient overflowed (and the scale lowered)
    run.scaler.update()
    _step_schedule(run)
    return terms_sum, value


def _step_schedule(run: _Run) -> None:
    """The schedule counts steps, skipped ones too (a constant rate is not stepped at all); torch warns when the first was skipped, which only fp16's
    scaler does: the warning is silenced there alone (a warnings filter per step costs a small student time)."""
    if not run.rate_changes:
        return
    if not run.scaler.is_enabled():
        run.scheduler.step()
        return
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", r"Detected call of `lr_scheduler\.step\(\)` before")
        run.scheduler.step()


def _shares(
    terms: dict[str, Tensor], units: list[dict[str, float]] | None, totals: dict[str, float], j: int
) -> dict[str, float]:
    """Each term's weight factor on micro-batch `j`: its share of the group's units of that term (0 when the group
    has none). Without accumulation (`units` None) every factor is 1: a term without units is zero already."""
    if units is None:
        return dict.fromkeys(terms, 1.0)
    return {k: units[j][unit_of(k)] / totals[unit_of(k)] if totals[unit_of(k)] else 0.0 for k in terms}


def _seed_micro_batch(run: _Run, j: int) -> None:
    """Dropout draws from a generator fixed by (seed, micro-batch, process): a resumed run redraws it. Only the
    generators that the step draws from are seeded (the CPU's, and the student's GPU's): `torch.manual_seed` also
    queues a seeding of every CUDA device, with a stack trace each on a machine without one, which cost a third of
    a small student's step."""
    seed = run.config.seed * 1_000_003 + _micro_index(run, j) * run.world + run.rank
    torch.random.default_generator.manual_seed(seed)
    if run.device.type == "cuda":
        index = run.device.index if run.device.index is not None else torch.cuda.current_device()
        torch.cuda.default_generators[index].manual_seed(seed)
    elif run.device.type != "cpu":
        torch.manual_seed(seed)


def _micro_index(run: _Run, j: int) -> int:
    """A number for micro-batch `j` of the current step, unique in the run (the step itself without accumulation)."""
    return run.state["step"] * run.config.grad_accum_steps + j


def _micro_batches(run: _Run, group: list[Tensor]) -> list[tuple[dict[str, Any], bool]]:
    """The group's micro-batches on the device, each with whether it is on-policy (GKD): then the student's own
    completions of its prompts, sampled before any backward of the group (the weights do not change within it)."""
    config, loss = run.config, run.loss
    micro = []
    for j, index in enumerate(group):
        batch = to_device(run.data.batch(index), run.device)
        m = _micro_index(run, j)
        sampled = on_policy_step(config.seed, m, loss.lmbda)
        if sampled:
            with autocast(run.device, run.autocast_dtype):
                batch = student_samples(
                    run.net, batch, max_new_tokens=loss.max_new_tokens, temperature=loss.sample_temperature,
                    seed=config.seed * 7919 + m * run.world + run.rank, pad_id=getattr(run.data, "pad_id", 0),
                    eos_id=getattr(getattr(run.model, "config", None), "eos_token_id", None),
                )  # fmt: skip
        micro.append((batch, sampled))
    return micro


def _check_finite(run: _Run, terms: dict[str, Tensor], total: Tensor, epoch: int) -> float:
    """The total's value, after checking that it is finite."""
    value = float(total.detach())
    if not math.isfinite(value):
        detail = ", ".join(f"{k}={float(v.detach()):.4g}" for k, v in terms.items())
        raise NonFiniteLossError(
            f"{run.name}: the loss became non-finite at step {run.state['step'] + 1} (epoch {epoch + 1}; {detail}); "
            "lower the learning rate or check the inputs for extreme values"
        )
    return value


def _forward(
    run: _Run, batch: dict[str, Any], on_policy: bool, fused: bool
) -> tuple[dict[str, Tensor], dict[str, float]]:
    """The loss terms of one micro-batch and their weights: on an on-policy batch (the student's own completions,
    GKD) the divergence alone, otherwise the terms of `loss_terms`. `fused`: the step minimises the terms with
    these weights exactly (no accumulation shares), so the chunked LM loss may form their gradients together."""
    if on_policy:
        return lm_terms(run.net, batch, run.teacher, run.loss, on_policy=True)
    return loss_terms(run.net, batch, run.teacher, run.loss, run.features, fused=fused)


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
    """What must match for a checkpoint to be resumed by this call: the data's size, the loss (with a teacher) and
    the training settings that change the arithmetic (`TrainConfig.arithmetic`)."""
    return {
        "rows": len(data),
        "train": config.arithmetic(),
        "loss": loss.model_dump() if teacher is not None else None,
    }


def _resume(run: _Run) -> None:
    """Continue from the run's checkpoint when there is one (a finished run's says that no epoch is left)."""
    if run.path is None or not run.path.exists():
        return
    saved = checkpoints.load(run.path, run.device)
    if saved["signature"] != run.signature:
        raise DistillError(
            f"checkpoint {run.path} was written by a run with other data or settings; "
            "resume with the same config, or delete it to start over"
        )
    distributed.load_full_state(run.model, run.optimizer, saved["model"], saved["optimizer"], run.config.strategy)
    if run.features is not None:
        run.features.load_state_dict(saved["features"])
    run.scheduler.load_state_dict(saved["scheduler"])
    if saved.get("scaler"):
        run.scaler.load_state_dict(saved["scaler"])
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
            "scaler": run.scaler.state_dict(),  # fp16's loss scale ({} when disabled)
            "state": plain(run.state),
        }
        checkpoints.save(run.path, payload)
    distributed.barrier()
