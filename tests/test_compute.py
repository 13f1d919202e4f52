"""distill.compute and its use by the loop: mixed precision (bf16, fp16 with a gradient scaler, the teacher in its own
precision, float32 losses in the chunks) and activation checkpointing."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch
import torch.nn.functional as F

from _steps import step_gradients
from conftest import blobs, mlp, tiny_gpt2
from distill import chunked, losses
from distill.compute import activation_checkpointing, autocast_dtype
from distill.config import LossConfig, TrainConfig
from distill.errors import DistillError
from distill.lm_data import Example, tokenize_examples
from distill.teachers import TeacherOutput
from distill.teachers.local import LocalTeacher
from distill.train import train

EXAMPLES = [
    Example("q : the dog runs", "a : the dog plays"),
    Example("q : a great movie", "a : best film of the year"),
    Example("", "the cat is happy and the dog is sad"),
    Example("q : bad food", "a : very bad"),
    Example("q : the man", "a : a woman is riding a horse"),
    Example("q : i love", "a : this funny story"),
]
CONFIG = TrainConfig(epochs=6, batch_size=4, lr=1e-2, schedule="constant", warmup=0.0)


def trained_teacher():
    """A 3-layer GPT-2 that knows the data (trained in float32), its tokenizer and the data."""
    teacher, tokenizer = tiny_gpt2(layers=3, seed=2)
    data = tokenize_examples(tokenizer, EXAMPLES * 4)
    train(teacher, data, CONFIG)
    return teacher, tokenizer, data


@contextmanager
def output_dtypes(*modules: torch.nn.Module) -> Iterator[list[set[torch.dtype]]]:
    """Inside, the dtypes of each module's outputs are recorded at every call."""
    seen: list[set[torch.dtype]] = [set() for _ in modules]
    handles = [m.register_forward_hook(lambda _m, _i, out, s=s: s.add(out.dtype)) for m, s in zip(modules, seen)]
    try:
        yield seen
    finally:
        for handle in handles:
            handle.remove()


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_training_reaches_the_float32_loss(precision):
    """A tiny GPT-2 pair distilled under bf16 / fp16 autocast ends within 5 % of the float32 run's loss, averaged
    over the last three epochs.

    Why 5 %: bf16 keeps 8 bits of mantissa (a relative rounding of 2^-8 = 0.4 % per operation) and fp16 11, and
    the rounding of each step moves the trajectory a little. Why three epochs: at this constant rate one epoch's
    loss moves by up to 10 % from the next, so the runs' last epochs alone differed by 1.5 % to 5.3 % as unrelated
    changes of rounding moved the trajectories (a closed-form gradient in the teacher's training, fused AdamW),
    where the three-epoch means stay within 1.5 %. Training lowers the loss by more than half, ten times the
    tolerance: a run that did not learn, or learned from a broken (say bf16 log-softmax) loss, cannot pass."""
    teacher, tokenizer, data = trained_teacher()
    loss = LossConfig(temperature=1.0, alpha=0.5, chunk_size=8)
    reference, _ = tiny_gpt2(seed=1)
    fp32 = train(reference, data, CONFIG, teacher=LocalTeacher(teacher, len(tokenizer)), loss=loss).history
    student, _ = tiny_gpt2(seed=1)
    with output_dtypes(student.transformer.h[0].mlp.c_fc) as (seen,):
        mixed = train(
            student,
            data,
            CONFIG.model_copy(update={"precision": precision, "teacher_precision": "fp32"}),
            teacher=LocalTeacher(teacher, len(tokenizer)),
            loss=loss,
        ).history
    assert seen == {{"bf16": torch.bfloat16, "fp16": torch.float16}[precision]}  # the forward ran in it
    assert all(p.dtype == torch.float32 for p in student.parameters())  # master weights stay float32
    assert fp32[0]["loss"] - fp32[-1]["loss"] > 0.5 * fp32[0]["loss"]

    def ends_at(history: list[dict[str, float]]) -> float:
        return sum(h["loss"] for h in history[-3:]) / 3

    assert ends_at(mixed) == pytest.approx(ends_at(fp32), rel=0.05)


def test_a_bf16_teacher_teaches_a_float32_student():
    teacher, tokenizer, data = trained_teacher()
    batch = data.batch(torch.arange(4))
    exact = LocalTeacher(teacher, len(tokenizer))(batch).logprobs
    live = LocalTeacher(teacher, len(tokenizer))
    student, _ = tiny_gpt2(seed=1)
    with output_dtypes(student.transformer.h[0].mlp.c_fc, teacher.transformer.h[0].mlp.c_fc) as seen:
        result = train(
            student,
            data,
            CONFIG.model_copy(update={"teacher_precision": "bf16"}),
            teacher=live,
            loss=LossConfig(alpha=1.0, chunk_size=8),
        )
    assert seen == [{torch.float32}, {torch.bfloat16}]  # the student in float32, its teacher in bf16
    assert all(p.dtype == torch.bfloat16 for p in teacher.parameters())  # cast once: half the teacher's memory
    assert all(p.dtype == torch.float32 for p in student.parameters())
    bf16 = live(batch).logprobs
    assert bf16.dtype == torch.float32  # log-probs handed over in float32
    mask = batch["kd_mask"]
    kl = losses.forward_kl(bf16[mask], exact[mask], temperature=1.0)  # KL(fp32 teacher || bf16 teacher)
    assert 0 < float(kl) < 1e-3
    assert result.history[-1]["kd"] < 0.5 * result.history[0]["kd"]


def test_a_teacher_precision_needs_a_live_teacher():
    class Stored:
        num_classes = 4

        def __call__(self, batch):
            return TeacherOutput(logprobs=torch.log_softmax(torch.zeros(len(batch["labels"]), 4), -1))

    with pytest.raises(DistillError, match="teacher_precision is bf16 but the run has no live teacher"):
        train(mlp(), blobs(32), TrainConfig(epochs=1, teacher_precision="bf16"), teacher=Stored())


def test_a_device_or_precision_the_machine_cannot_run_is_refused_before_training():
    model = mlp()
    with pytest.raises(DistillError, match="cannot run on meta; use cpu, cuda, cuda:N or mps"):
        train(model, blobs(32), TrainConfig(epochs=1, precision="bf16", device="meta"))
    with pytest.raises(DistillError, match="'gpu0' is not a device"):
        train(model, blobs(32), TrainConfig(epochs=1, device="gpu0"))
    if not torch.cuda.is_available():
        with pytest.raises(DistillError, match="cannot run on cuda: this machine has no CUDA device"):
            train(model, blobs(32), TrainConfig(epochs=1, precision="fp16", device="cuda"))
    assert next(model.parameters()).device.type == "cpu"  # refused before anything moved
    # torch turns autocast off with a warning where it cannot run: refused, not float32 in silence
    with pytest.raises(DistillError, match="precision bf16 cannot run on device 'meta'"):
        autocast_dtype(torch.device("meta"), "bf16")
    assert autocast_dtype(torch.device("cpu"), "bf16") == torch.bfloat16
    assert autocast_dtype(torch.device("cpu"), "fp32") is None


def test_chunked_losses_run_in_float32_on_bf16_logits():
    """Under bf16 autocast the head's product is bf16, but the log-softmax and the divergence see float32: the
    chunked value equals LOSSES on the full bf16 logits cast to float32, to float32 rounding."""
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(12, 8, generator=g).requires_grad_(True)  # (N, H)
    head = (torch.randn(30, 8, generator=g) * 0.5).requires_grad_(True)  # (V, H)
    teacher = F.log_softmax(torch.randn(12, 30, generator=g), -1)  # (N, V)
    labels = torch.randint(30, (12,), generator=g)  # (N,)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        kd, ce = chunked.chunked_kd_and_ce(hidden, head, teacher_logprobs=teacher, labels=labels, chunk_size=5)
        full = F.linear(hidden, head)  # (N, V)
    assert full.dtype == torch.bfloat16 and kd.dtype == ce.dtype == torch.float32
    expected_kd = losses.forward_kl(full.float(), teacher, temperature=1.0)
    expected_ce = losses.hard_label_ce(full.float(), labels)
    assert torch.allclose(kd, expected_kd, rtol=1e-5) and torch.allclose(ce, expected_ce, rtol=1e-5)
    got = torch.autograd.grad(kd + ce, [hidden, head])
    expected = torch.autograd.grad(expected_kd + expected_ce, [hidden, head])
    for a, b in zip(got, expected):
        assert a.dtype == torch.float32
        assert torch.allclose(a, b, rtol=0.02, atol=2e-3)  # the products are bf16 on both sides
    # a model whose weights are bf16 (no autocast): float32 loss, gradients in the weights' dtype
    low = [t.detach().bfloat16().requires_grad_(True) for t in (hidden, head)]
    kd_low, _ = chunked.chunked_kd_and_ce(*low, teacher_logprobs=teacher, chunk_size=5)
    assert kd_low.dtype == torch.float32 and float(kd_low.detach()) == pytest.approx(
        float(expected_kd.detach()), rel=0.02
    )
    assert [t.dtype for t in torch.autograd.grad(kd_low, low)] == [torch.bfloat16, torch.bfloat16]


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_activation_checkpointing_recomputes_blocks_and_gives_the_same_gradients(dropout):
    """With dropout 0 the recomputed blocks are the same arithmetic; with dropout, non-reentrant checkpointing
    replays the forward's random state, so the masks (and gradients) are the same too."""
    teacher, tokenizer = tiny_gpt2(layers=3, seed=2)
    data = tokenize_examples(tokenizer, EXAMPLES)
    runs = []
    for checkpointing in (False, True):
        student, _ = tiny_gpt2(seed=1)
        for module in student.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = dropout
        calls = []
        pre = student.transformer.h[0].mlp.register_forward_pre_hook(lambda *_, c=calls: c.append(1))
        config = TrainConfig(epochs=1, batch_size=3, lr=1e-2, activation_checkpointing=checkpointing)
        gradients, result = step_gradients(
            lambda s=student, c=config: train(
                s, data, c, teacher=LocalTeacher(teacher, len(tokenizer)), loss=LossConfig(chunk_size=4)
            )  # fmt: skip
        )
        pre.remove()
        runs.append((gradients, result.history, len(calls)))
        assert not student.is_activation_checkpointing and student.config.use_cache  # restored after training
    (plain, plain_history, plain_calls), (recomputed, history, calls) = runs
    assert (plain_calls, calls) == (2, 4)  # 2 steps; with checkpointing each block runs again in backward
    assert len(plain) == len(recomputed) == 2
    for before, after in zip(plain, recomputed):
        for a, b in zip(before, after):
            assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)
    # the logged losses to the gradients' float32 tolerance: under a loaded xdist run the recomputed forward's kd
    # differed from the plain one's in the 6th digit (4e-6 relative, dropout 0.1)
    assert history[0] == pytest.approx(plain_history[0], rel=1e-5)


def test_activation_checkpointing_is_refused_for_a_model_without_it():
    with pytest.raises(DistillError, match="activation_checkpointing needs a Hugging Face transformer"):
        train(mlp(), blobs(32), TrainConfig(epochs=1, activation_checkpointing=True))
    with activation_checkpointing(mlp(), False):  # off: nothing to check
        pass
