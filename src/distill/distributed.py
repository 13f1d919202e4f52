"""Training on several processes (`torchrun`): the one module that knows about `torch.distributed`.

It joins and leaves the process group, says which process this is (rank) and how many there are (world size), waits
for the others (barrier), wraps a model for DDP or FSDP, holds back the gradients' synchronisation on the inner steps
of an accumulation, gathers and restores full state dicts, averages gradients and means over processes. Everything here is a no-op, or the single-process answer, when no process group is
initialised: the same code trains on one process or many.

The CLI calls `join_torchrun()` before a command and `leave()` after it; library code asks `rank()` and
`world_size()` and never reads the environment.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from distill.errors import DistillError


def join_torchrun() -> int:
    """Join the process group that `torchrun` describes in the environment (WORLD_SIZE > 1): NCCL on GPUs (each
    process on the GPU of its LOCAL_RANK), gloo on CPUs. Returns the world size (1 outside torchrun).

    What the CLI calls at start: the only function of the library that reads the environment, because torchrun
    passes the process group's description there and nowhere else."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        torch.distributed.init_process_group(backend)
    return world


def leave() -> None:
    """After a command that ran under torchrun: wait for every process, then leave the group (a process that exits
    while gloo's threads still hold work can abort with "terminate called without an active exception")."""
    if _initialised():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def _initialised() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def rank() -> int:
    """This process's rank: 0 unless a process group is initialised."""
    return torch.distributed.get_rank() if _initialised() else 0


def world_size() -> int:
    """The number of processes training together: 1 unless a process group is initialised."""
    return torch.distributed.get_world_size() if _initialised() else 1


def barrier() -> None:
    """Wait for every process (nothing to wait for on one)."""
    if world_size() > 1:
        torch.distributed.barrier()


def sharded(strategy: str) -> bool:
    """Whether the model is sharded across processes (FSDP on more than one): every process then takes part in
    its forward and in gathering its state."""
    return strategy == "fsdp" and world_size() > 1


def wrap(module: nn.Module, device: torch.device, strategy: str = "ddp") -> nn.Module:
    """With several processes: DistributedDataParallel around `module` (gradients averaged across processes), or
    FSDP (`strategy="fsdp"`: parameters, gradients and optimizer state sharded; each transformer block a unit).
    Call it before making the optimizer: FSDP replaces the parameters."""
    if world_size() == 1 or not any(p.requires_grad for p in module.parameters()):
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


def unwrap(model: nn.Module) -> Any:
    """The model inside a DistributedDataParallel wrapper (or the model itself; FSDP shards in place)."""
    return getattr(model, "module", model)


@contextmanager
def gradient_sync(model: nn.Module, sync: bool) -> Iterator[None]:
    """The forward and backward passes inside add their gradients across processes only when `sync`: under
    gradient accumulation, every micro-batch but the group's last runs with `sync=False` (DDP's `no_sync`, FSDP's
    `set_requires_gradient_sync(False)`), and the last one's backward reduces the summed gradients once. A model
    that is not wrapped (one process) has nothing to synchronise."""
    if sync:
        yield
    elif is_fsdp(model):
        model.set_requires_gradient_sync(False)  # type: ignore[operator]
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)  # type: ignore[operator]
    elif callable(getattr(model, "no_sync", None)):
        with model.no_sync():  # type: ignore[operator]
            yield
    else:
        yield


def is_fsdp(model: nn.Module) -> bool:
    """Whether `model` is sharded by FSDP, which gathers its parameters in its root forward only."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch without FSDP2
        return False
    return isinstance(model, FSDPModule)


def full_state(
    model: nn.Module, optimizer: torch.optim.Optimizer, strategy: str
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Unsharded model and optimizer state (gathered on every process under FSDP: a collective call)."""
    if sharded(strategy):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        return get_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return model.state_dict(), optimizer.state_dict()


def load_full_state(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    model_state: dict[str, Any],
    optimizer_state: dict[str, Any],
    strategy: str,
) -> None:
    """Restore what `full_state` gave (each process takes its shard under FSDP)."""
    if sharded(strategy):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        options = StateDictOptions(full_state_dict=True)
        set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=optimizer_state,
                       options=options)  # fmt: skip
        return
    model.load_state_dict(model_state)
    optimizer.load_state_dict(optimizer_state)


def average_gradients(parameters: Iterable[Tensor]) -> None:
    """Average the gradients of parameters that no DDP wrapper averages (such as feature projections) over the
    processes, in place."""
    world = world_size()
    if world == 1:
        return
    for parameter in parameters:
        if parameter.grad is not None:
            torch.distributed.all_reduce(parameter.grad)
            parameter.grad /= world


def mean_over_processes(sums: dict[str, float], count: int) -> dict[str, float]:
    """Every key's sum over all processes divided by the total count (each process gives its own sums and count)."""
    keys = sorted(sums)
    if world_size() > 1:
        values = torch.tensor([sums[k] for k in keys] + [float(count)], dtype=torch.float64)
        torch.distributed.all_reduce(values)
        sums, count = dict(zip(keys, values[:-1].tolist())), int(values[-1])
    return {k: sums[k] / max(count, 1) for k in keys}
