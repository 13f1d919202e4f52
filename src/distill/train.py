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
from distill.lm import is_causal_lm, lm_terms, on_policy_step, student_samples
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
            if output_of_teacher.mask is not None:  # positions the teacher has no distribution for weigh 0
                covered = output_of_teacher.mask.to(student_logits.device)
                kd_mask = covered if kd_mask is None else kd_mask & covered
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


def _distributed() -> tuple[int, int]:
    """(rank, world size) of this process: (0, 1) unless a process group is initialised (torchrun)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _barrier(world: int) -> None:
    if world > 1:
        torch.distributed.barrier()


def _wrap(module: nn.Module, device: torch.device, world: int, strategy: str = "ddp") -> nn.Module:
    """With several processes: DistributedDataParallel around `module` (gradients averaged across processes), or
    FSDP (`strategy="fsdp"`: parameters, gradients and optimizer state sharded; each transformer block a unit)."""
    if world == 1 or not any(p.requires_grad for p in module.parameters()):
        return module
    if strategy == "fsdp":
        from torch.distributed.fsdp import fully_shard

        from distill.students import layer_stack

        try:
            _, blocks = layer_stack(module)
        except DistillError:
            blocks = nn.ModuleList()
        for block in blocks:
            fully_shard(block)
        fully_shard(module)
        return module
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" and device.index is not None else None
    return DistributedDataParallel(module, device_ids=ids)


def _full_state(
    model: nn.Module, optimizer: torch.optim.Optimizer, strategy: str, world: int
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Unsharded model and optimizer state (gathered on every process under FSDP; a collective call)."""
    if strategy == "fsdp" and world > 1:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        return get_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return model.state_dict(), optimizer.state_dict()


def _load_state(
    model: nn.Module, optimizer: torch.optim.Optimizer, saved: dict[str, Any], strategy: str, world: int
) -> None:
    if strategy == "fsdp" and world > 1:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        options = StateDictOptions(full_state_dict=True)
        set_state_dict(model, optimizer, model_state_dict=saved["model"], optim_state_dict=saved["optimizer"],
                       options=options)  # fmt: skip
        return
    model.load_state_dict(saved["model"])
    optimizer.load_state_dict(saved["optimizer"])


def _mean_over_processes(sums: dict[str, float], count: int, world: int) -> dict[str, float]:
    """The epoch's mean of every loss term over all processes' steps."""
    keys = sorted(sums)
    if world > 1:
        values = torch.tensor([sums[k] for k in keys] + [float(count)], dtype=torch.float64)
        torch.distributed.all_reduce(values)
        sums, count = dict(zip(keys, values[:-1].tolist())), int(values[-1])
    return {k: sums[k] / max(count, 1) for k in keys}


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
    rank, world = _distributed()
    if rank != 0:
        reporter = NULL  # one process reports; every process trains
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
    net = _wrap(model, device, world, config.strategy)  # before the optimizer: FSDP replaces the parameters
    trained = [model] if features is None else [model, features.to(device)]
    optimizer = make_optimizer(trained, config)
    total_steps = config.epochs * batches_per_epoch
    scheduler = make_scheduler(optimizer, config, total_steps)
    signature = _signature(data, config, teacher, loss) | {"processes": world}

    state: dict[str, Any] = {"epoch": 0, "batch": 0, "step": 0, "history": [], "sums": {}, "count": 0, "seconds": 0.0}
    path = Path(checkpoint_dir) / CHECKPOINT if checkpoint_dir is not None else None
    if path is not None:
        if rank == 0:
            path.parent.mkdir(parents=True, exist_ok=True)
        if resume and path.exists():
            saved = _load_checkpoint(path, device)
            if saved["signature"] != signature:
                raise DistillError(
                    f"checkpoint {path} was written by a run with other data or settings; "
                    "resume with the same config, or delete it to start over"
                )
            _load_state(model, optimizer, saved, config.strategy, world)
            if features is not None:
                features.load_state_dict(saved["features"])
            scheduler.load_state_dict(saved["scheduler"])
            state = saved["state"]

    def checkpoint() -> None:
        if path is None:
            return
        model_state, optimizer_state = _full_state(model, optimizer, config.strategy, world)  # collective with FSDP
        if rank == 0:
            payload = {
                "signature": plain(signature),
                "model": model_state,  # torch's own state dicts: tensors and plain data already
                "features": features.state_dict() if features is not None else None,
                "optimizer": optimizer_state,
                "scheduler": plain(scheduler.state_dict()),
                "state": plain(state),
            }
            _save(path, payload)
        _barrier(world)

    reporter.stage(name, total=total_steps)
    reporter.advance(state["step"])
    started = time.perf_counter() - state["seconds"]
    for epoch in range(state["epoch"], config.epochs):
        order = epoch_order(len(data), config.batch_size, config.seed, epoch, lengths)
        mine = order[rank : batches_per_epoch * world : world]  # every process its share, the same count each
        net.train()
        for position in range(state["batch"], len(mine)):
            if reporter.cancelled():
                checkpoint()
                raise Cancelled(f"{name} cancelled at step {state['step']}")
            # Dropout and sampling draw from a generator fixed by (seed, step, process): a resumed run redraws them.
            torch.manual_seed(config.seed * 1_000_003 + state["step"] * world + rank)
            batch = to_device(data.batch(mine[position]), device)
            if on_policy_step(config.seed, state["step"], loss.lmbda):
                batch = student_samples(
                    net, batch, max_new_tokens=loss.max_new_tokens, temperature=loss.sample_temperature,
                    seed=config.seed * 7919 + state["step"] * world + rank, pad_id=getattr(data, "pad_id", 0),
                    eos_id=getattr(getattr(model, "config", None), "eos_token_id", None),
                )  # fmt: skip
                terms, weights = lm_terms(net, batch, teacher, loss, on_policy=True)
            else:
                terms, weights = loss_terms(net, batch, teacher, loss, features)
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
            if world > 1 and features is not None:  # the projections are not inside the DDP wrapper
                for parameter in features.parameters():
                    if parameter.grad is not None:
                        torch.distributed.all_reduce(parameter.grad)
                        parameter.grad /= world
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
        record.update(_mean_over_processes(state["sums"], state["count"], world))
        record["lr"] = float(scheduler.get_last_lr()[0])
        sharded = config.strategy == "fsdp" and world > 1  # every process takes part in a sharded model's forward
        due = (epoch + 1) % config.eval_every == 0 or epoch + 1 == config.epochs
        if evaluate is not None and due and (rank == 0 or sharded):
            model.eval()
            record.update(plain(evaluate(model)))
            model.train()
        state["history"].append(record)
        reporter.event("epoch", run=name, **record)
        state.update(epoch=epoch + 1, batch=0, sums={}, count=0, seconds=time.perf_counter() - started)
        checkpoint()
    reporter.end()
    model.eval()
    full = _full_state(model, optimizer, config.strategy, world)[0] if config.strategy == "fsdp" and world > 1 else None
    return TrainResult(
        model=model, history=list(state["history"]), steps=state["step"], seconds=state["seconds"], state_dict=full
    )
