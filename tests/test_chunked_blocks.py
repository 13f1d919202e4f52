"""The chunked head + loss (`distill.chunked`) equals the full path when its chunks are split into blocks: loss and
gradients of the student's hidden states, head and bias, for every divergence, dense and sparse teachers, with
weights (ignored positions) and labels; and the blocks are what autograd sees."""

import pytest
import torch
import torch.nn.functional as F

from distill import chunked, losses
from distill.chunked import chunked_kd_and_ce

torch.set_num_threads(1)

N, H, HT, V = 23, 6, 5, 17


def inputs(seed):
    g = torch.Generator().manual_seed(seed)
    student = [torch.randn(N, H, generator=g), torch.randn(V, H, generator=g) * 0.8, torch.randn(V, generator=g)]
    teacher = [torch.randn(N, HT, generator=g), torch.randn(V, HT, generator=g) * 0.8, torch.randn(V, generator=g)]
    labels = torch.randint(0, V, (N,), generator=g)
    labels[torch.rand(N, generator=g) < 0.3] = -100  # positions without a label (prompt tokens)
    weights = (torch.rand(N, generator=g) < 0.7).float()  # positions the divergence ignores weigh 0
    return [t.requires_grad_(True) for t in student], teacher, labels, weights


def full_path(student, teacher_logprobs, token_ids, labels, weights, divergence, temperature):
    """The unchunked terms and the gradients of 0.3 kd + 0.7 ce, from the full (N, V) logits."""
    logits = F.linear(*student)  # (N, V)
    kd = losses.LOSSES[divergence](
        logits, teacher_logprobs, token_ids=token_ids, temperature=temperature, teacher_temperature=temperature,
        mask=weights, beta=0.3,
    )  # fmt: skip
    ce = losses.hard_label_ce(logits, labels)
    return kd.detach(), ce.detach(), torch.autograd.grad(0.3 * kd + 0.7 * ce, student)


@pytest.mark.parametrize("divergence", sorted(losses.LOSSES))
@pytest.mark.parametrize("form", ["head", "sparse"])
@pytest.mark.parametrize("chunk_size, block", [(5, 2), (8, 3), (64, 1), (7, 7)])
def test_blocks_of_chunks_equal_the_full_path(monkeypatch, divergence, form, chunk_size, block):
    monkeypatch.setattr(chunked, "BLOCK_ELEMENTS", block * V)
    student, teacher, labels, weights = inputs(seed=3)
    temperature = 1.5
    teacher_logprobs = F.log_softmax(F.linear(*teacher) / temperature, -1)  # (N, V) at T
    if form == "head":
        given = {"teacher_hidden": teacher[0], "teacher_head": teacher[1], "teacher_bias": teacher[2]}
        token_ids = None
    else:
        teacher_logprobs, token_ids = teacher_logprobs.topk(4, dim=-1)  # (N, 4) at T
        given = {"teacher_logprobs": teacher_logprobs, "token_ids": token_ids, "teacher_temperature": temperature}
    kd, ce = chunked_kd_and_ce(
        *student[:2], student_bias=student[2], divergence=divergence, temperature=temperature, beta=0.3,
        weights=weights, chunk_size=chunk_size, labels=labels, **given,
    )  # fmt: skip
    grads = torch.autograd.grad(0.3 * kd + 0.7 * ce, student)
    kd_full, ce_full, grads_full = full_path(student, teacher_logprobs, token_ids, labels, weights, divergence,
                                             temperature)  # fmt: skip
    assert torch.allclose(kd, kd_full, rtol=1e-5, atol=1e-6) and torch.allclose(ce, ce_full, rtol=1e-5, atol=1e-6)
    for name, got, expected in zip(("hidden", "head", "bias"), grads, grads_full):
        assert torch.allclose(got, expected, rtol=1e-4, atol=1e-6), (name, (got - expected).abs().max())
    assert float(grads[0].abs().sum()) > 0


def test_autograd_sees_blocks_within_chunks(monkeypatch):
    seen = []
    original = losses.LOSSES["jsd"]

    def spy(student_logits, *args, **kwargs):
        seen.append(tuple(student_logits.shape))
        return original(student_logits, *args, **kwargs)

    monkeypatch.setitem(losses.LOSSES, "jsd", spy)
    monkeypatch.setattr(chunked, "BLOCK_ELEMENTS", 3 * V + 1)  # three rows of V per block
    student, teacher, _, _ = inputs(seed=4)
    chunked.chunked_token_loss(*student[:2], teacher_hidden=teacher[0], teacher_head=teacher[1], divergence="jsd",
                               chunk_size=8)  # fmt: skip
    assert seen == [(3, V), (3, V), (2, V)] * 2 + [(3, V), (3, V), (1, V)]
    assert chunked.block_rows(8, V) == 3 and chunked.block_rows(2, V) == 2 and chunked.block_rows(8, 10**9) == 1


def test_bf16_products_under_autocast_keep_the_float32_values():
    """Under bf16 autocast the head's products (and the logits buffer) are bf16; the loss stays float32 and close
    to the float32 value, and the gradients keep the inputs' dtypes."""
    student, teacher, labels, weights = inputs(seed=5)
    given = {"teacher_hidden": teacher[0], "teacher_head": teacher[1], "weights": weights, "labels": labels}
    kd32, ce32 = chunked_kd_and_ce(*student[:2], chunk_size=4, **given)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        kd16, ce16 = chunked_kd_and_ce(*student[:2], chunk_size=4, **given)
    assert kd16.dtype == torch.float32 and torch.allclose(kd16, kd32, rtol=5e-2)
    assert torch.allclose(ce16, ce32, rtol=5e-2)
    hidden_grad, head_grad = torch.autograd.grad(kd16 + ce16, student[:2])
    assert hidden_grad.dtype == torch.float32 and head_grad.dtype == torch.float32


@pytest.mark.parametrize("divergence", ["forward_kl", "jsd"])
@pytest.mark.parametrize("form", ["head", "sparse"])
def test_fused_gradients_equal_the_separate_ones(divergence, form):
    """With ce_per_kd the two terms' gradients share one pair of head products: the same values and gradients of
    0.3 kd + 0.7 ce as the separate terms, for a cached (closed-form) and a live teacher."""
    student, teacher, labels, weights = inputs(seed=5)
    if form == "head":
        given = {"teacher_hidden": teacher[0], "teacher_head": teacher[1], "teacher_bias": teacher[2]}
    else:
        top = F.log_softmax(F.linear(*teacher), -1).topk(4, dim=-1)
        given = {"teacher_logprobs": top.values, "token_ids": top.indices}
    common = {"student_bias": student[2], "divergence": divergence, "weights": weights, "chunk_size": 8,
              "labels": labels, **given}  # fmt: skip
    kd, ce = chunked_kd_and_ce(*student[:2], **common)
    separate = torch.autograd.grad(0.3 * kd + 0.7 * ce, student)
    kd_f, ce_f = chunked_kd_and_ce(*student[:2], ce_per_kd=0.7 / 0.3, **common)
    fused = torch.autograd.grad(0.3 * kd_f + 0.7 * ce_f, student)
    assert torch.equal(kd, kd_f) and torch.equal(ce, ce_f)
    for got, expected in zip(fused, separate):
        assert torch.allclose(got, expected, rtol=1e-5, atol=1e-7)


def test_fused_gradients_refuse_other_weights():
    student, teacher, labels, weights = inputs(seed=6)
    given = {"teacher_hidden": teacher[0], "teacher_head": teacher[1], "labels": labels}
    kd, ce = chunked_kd_and_ce(*student[:2], ce_per_kd=1.0, **given)
    with pytest.raises(RuntimeError, match="ce_per_kd=1.0"):
        torch.autograd.grad(0.3 * kd + 0.7 * ce, student[:2])
    for bad in (float("nan"), -1.0, float("inf")):
        with pytest.raises(ValueError, match="ce_per_kd"):
            chunked_kd_and_ce(*student[:2], ce_per_kd=bad, **given)
