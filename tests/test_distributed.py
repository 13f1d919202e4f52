"""distill.distributed on one process (what every test and most runs see); tests/test_train.py runs it on two
(`_ddp_script.py` under torchrun, which joins and leaves the group through this module)."""

from __future__ import annotations

import torch

from conftest import mlp
from distill import distributed


def test_one_process_is_rank_zero_of_one_and_waits_for_nobody(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert distributed.join_torchrun() == 1
    assert not torch.distributed.is_initialized()  # no process group for a single process
    assert (distributed.rank(), distributed.world_size()) == (0, 1)
    distributed.barrier()
    distributed.leave()  # nothing joined, nothing to leave
    assert not distributed.sharded("fsdp")


def test_one_process_trains_the_model_itself_and_means_its_own_sums():
    model = mlp()
    assert distributed.wrap(model, torch.device("cpu"), "ddp") is model
    assert distributed.wrap(model, torch.device("cpu"), "fsdp") is model
    assert distributed.unwrap(model) is model and not distributed.is_fsdp(model)
    assert distributed.mean_over_processes({"kd": 3.0, "ce": 1.5}, 3) == {"ce": 0.5, "kd": 1.0}
    assert distributed.mean_over_processes({"kd": 0.0}, 0) == {"kd": 0.0}
    model(torch.randn(2, 8)).sum().backward()
    before = [p.grad.clone() for p in model.parameters()]
    distributed.average_gradients(model.parameters())  # one process: its gradients are the average
    assert all(torch.equal(a, p.grad) for a, p in zip(before, model.parameters()))
    optimizer = torch.optim.AdamW(model.parameters())
    model_state, optimizer_state = distributed.full_state(model, optimizer, "ddp")
    assert model_state.keys() == model.state_dict().keys()
    other = mlp(seed=1)
    distributed.load_full_state(other, torch.optim.AdamW(other.parameters()), model_state, optimizer_state, "ddp")
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), other.parameters()))


def test_gradient_sync_holds_back_ddp_reductions_on_inner_micro_steps():
    """A one-process gloo group, so that DDP really wraps the model: its communication hook runs on the backward of
    a synchronised step only."""
    from torch.nn.parallel import DistributedDataParallel

    torch.distributed.init_process_group("gloo", rank=0, world_size=1, store=torch.distributed.HashStore())
    try:
        ddp = DistributedDataParallel(mlp())
        reductions = []

        def hook(state, bucket):
            reductions.append(1)
            future = torch.futures.Future()
            future.set_result(bucket.buffer())
            return future

        ddp.register_comm_hook(None, hook)
        for sync in (False, False, True):
            with distributed.gradient_sync(ddp, sync):
                ddp(torch.randn(4, 8)).sum().backward()
            assert len(reductions) == (1 if sync else 0)
        plain = mlp()
        with distributed.gradient_sync(plain, False):  # not wrapped: nothing to hold back
            plain(torch.randn(4, 8)).sum().backward()
    finally:
        torch.distributed.destroy_process_group()
