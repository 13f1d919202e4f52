import pytest
import torch
import torch.nn.functional as F

from distill import chunked, closed_form, losses
from distill.errors import ShapeMismatchError

NAMES = sorted(losses.LOSSES)
N, H, HT, V = 10, 6, 8, 13


def models(seed=0, n=N, v=V):
    """Student hidden (N, H), head (V, H), bias (V,) that require grad; teacher hidden (N, HT), head, bias."""
    g = torch.Generator().manual_seed(seed)
    student = [torch.randn(n, H, generator=g), torch.randn(v, H, generator=g) * 0.7, torch.randn(v, generator=g)]
    teacher = [torch.randn(n, HT, generator=g), torch.randn(v, HT, generator=g) * 0.7, torch.randn(v, generator=g)]
    return [t.requires_grad_(True) for t in student], teacher


def teacher_args(form, teacher, temperature):
    """The teacher in one of three forms, and the (log-probs, token_ids, teacher_temperature) the unchunked
    LOSSES get for the same teacher."""
    logits = F.linear(*teacher)  # (N, V)
    if form == "hidden_head":
        given = {"teacher_hidden": teacher[0], "teacher_head": teacher[1], "teacher_bias": teacher[2]}
        return given, (F.log_softmax(logits, -1), None, 1.0)
    if form == "dense_logprobs":  # log-probs at another temperature than the loss's: the loss rescales them
        logprobs = F.log_softmax(logits / 1.5, -1)
        return {"teacher_logprobs": logprobs, "teacher_temperature": 1.5}, (logprobs, None, 1.5)
    values, ids = F.log_softmax(logits / temperature, -1).topk(4, dim=-1)  # sparse top-4 at the loss's T
    given = {"teacher_logprobs": values, "token_ids": ids, "teacher_temperature": temperature}
    return given, (values, ids, temperature)


def value_and_grads(loss, student):
    grads = torch.autograd.grad(loss, student)
    return loss.detach(), grads


def assert_close(got, expected):
    (got_value, got_grads), (value, grads) = got, expected
    assert torch.allclose(got_value, value, rtol=1e-5, atol=1e-6), (got_value, value)
    for name, a, b in zip(("hidden", "head", "bias"), got_grads, grads):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6), (name, (a - b).abs().max())


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("form", ["hidden_head", "dense_logprobs", "sparse"])
@pytest.mark.parametrize("chunk_size", [3, 5, 64])
def test_chunked_equals_unchunked(name, form, chunk_size):
    student, teacher = models(seed=1)
    temperature = 2.0
    given, (logprobs, ids, t0) = teacher_args(form, teacher, temperature)
    weights = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 0.5, 1.0, 2.0, 0.0, 1.0])
    for w in (None, weights):
        got = chunked.chunked_token_loss(
            student[0], student[1], student_bias=student[2], divergence=name, temperature=temperature, beta=0.3,
            weights=w, chunk_size=chunk_size, **given,
        )  # fmt: skip
        expected = losses.LOSSES[name](
            F.linear(*student), logprobs, token_ids=ids, temperature=temperature, teacher_temperature=t0, mask=w,
            beta=0.3,
        )  # fmt: skip
        assert float(expected.detach()) > 1e-3  # a real comparison, not zero against zero
        assert_close(value_and_grads(got, student), value_and_grads(expected, student))


@pytest.mark.parametrize("temperature", [0.5, 1.0, 4.0])
def test_temperature_matches_unchunked_for_a_teacher_head(temperature):
    student, teacher = models(seed=2)
    got = chunked.chunked_token_loss(
        student[0], student[1], student_bias=student[2], teacher_hidden=teacher[0], teacher_head=teacher[1],
        teacher_bias=teacher[2], temperature=temperature, chunk_size=4,
    )  # fmt: skip
    expected = losses.forward_kl(F.linear(*student), F.log_softmax(F.linear(*teacher), -1), temperature=temperature)
    assert_close(value_and_grads(got, student), value_and_grads(expected, student))
    # ... and the closed form d KL / d z_s = (q - p) / (T N), through the head: d / d hidden = that @ head
    p = torch.softmax(F.linear(*teacher) / temperature, -1)
    q = torch.softmax(F.linear(*student) / temperature, -1)
    grad_logits = ((q - p) / (temperature * N)).detach()
    again = chunked.chunked_token_loss(
        student[0], student[1], teacher_logprobs=F.log_softmax(F.linear(*teacher), -1), temperature=temperature,
        student_bias=student[2], chunk_size=3,
    )  # fmt: skip
    hidden_grad, head_grad, bias_grad = torch.autograd.grad(again, student)
    assert torch.allclose(hidden_grad, grad_logits @ student[1].detach(), atol=1e-6)
    assert torch.allclose(head_grad, grad_logits.t() @ student[0].detach(), atol=1e-6)
    assert torch.allclose(bias_grad, grad_logits.sum(0), atol=1e-6)


@pytest.mark.parametrize("name", NAMES)
def test_sparse_equals_dense_when_k_is_v(name):
    student, teacher = models(seed=3)
    logprobs = F.log_softmax(F.linear(*teacher) / 2.0, -1)  # (N, V)
    values, ids = logprobs.topk(V, dim=-1)
    common = {"student_bias": student[2], "divergence": name, "temperature": 2.0, "teacher_temperature": 2.0}
    dense = chunked.chunked_token_loss(student[0], student[1], teacher_logprobs=logprobs, chunk_size=4, **common)
    sparse = chunked.chunked_token_loss(
        student[0], student[1], teacher_logprobs=values, token_ids=ids, chunk_size=3, **common
    )
    assert_close(value_and_grads(sparse, student), value_and_grads(dense, student))


def test_zero_weight_rows_contribute_nothing():
    student, teacher = models(seed=4)
    weights = torch.tensor([1, 1, 0, 1, 0, 0, 1, 1, 1, 0], dtype=torch.bool)
    logprobs = F.log_softmax(F.linear(*teacher), -1)
    loss = chunked.chunked_token_loss(student[0], student[1], teacher_logprobs=logprobs, weights=weights, chunk_size=4)
    hidden_grad, head_grad = torch.autograd.grad(loss, student[:2])
    assert (hidden_grad[~weights] == 0).all() and (hidden_grad[weights].abs().sum(-1) > 0).all()
    # Arbitrary changes in the masked rows change nothing; the value is the mean over the kept rows.
    changed = student[0].detach().clone()
    changed[~weights] = 100.0
    other = logprobs.clone()
    other[~weights] = F.log_softmax(torch.randn(4, V), -1)
    again = chunked.chunked_token_loss(changed, student[1], teacher_logprobs=other, weights=weights, chunk_size=3)
    assert torch.allclose(loss, again, atol=1e-6)
    kept = chunked.chunked_token_loss(student[0][weights], student[1], teacher_logprobs=logprobs[weights])
    assert torch.allclose(loss, kept, atol=1e-6)
    none_kept = chunked.chunked_token_loss(
        student[0], student[1], teacher_logprobs=logprobs, weights=torch.zeros(N), chunk_size=4
    )
    assert float(none_kept.detach()) == 0.0


@pytest.mark.parametrize("divergence", ["reverse_kl", "forward_kl"])
def test_positions_are_taken_chunk_by_chunk(monkeypatch, divergence):
    """By LOSSES with autograd, or (forward KL with gradients) by `closed_form`: a chunk at a time either way."""
    seen = []

    def spying(original):
        def spy(student_logits, *args, **kwargs):
            seen.append(tuple(student_logits.shape))
            return original(student_logits, *args, **kwargs)

        return spy

    monkeypatch.setitem(losses.LOSSES, divergence, spying(losses.LOSSES[divergence]))
    monkeypatch.setattr(closed_form, "dense_forward_kl_grad", spying(closed_form.dense_forward_kl_grad))
    student, teacher = models(seed=5)
    chunked.chunked_token_loss(student[0], student[1], teacher_hidden=teacher[0], teacher_head=teacher[1],
                               divergence=divergence, chunk_size=4)  # fmt: skip
    assert seen == [(4, V), (4, V), (2, V)]


def test_backward_scales_by_incoming_gradient_and_only_where_needed():
    student, teacher = models(seed=6)
    teacher = [t.requires_grad_(True) for t in teacher]
    frozen_head = student[1].detach()
    loss = chunked.chunked_token_loss(
        student[0], frozen_head, teacher_hidden=teacher[0], teacher_head=teacher[1], chunk_size=3
    )
    (3.0 * loss).backward()
    assert frozen_head.grad is None and all(t.grad is None for t in teacher)
    single = chunked.chunked_token_loss(student[0], frozen_head, teacher_hidden=teacher[0], teacher_head=teacher[1])
    (expected,) = torch.autograd.grad(single, student[0])
    assert torch.allclose(student[0].grad, 3.0 * expected, atol=1e-6)
    assert float(expected.abs().max()) > 1e-4
    with torch.no_grad():  # evaluation: a value and no gradients
        value = chunked.chunked_token_loss(student[0], frozen_head, teacher_hidden=teacher[0], teacher_head=teacher[1])
    assert not value.requires_grad and torch.allclose(value, single.detach())


def test_shape_errors():
    student, teacher = models(seed=7)
    hidden, head = student[0], student[1]
    logprobs = F.log_softmax(F.linear(*teacher), -1)  # (N, V)
    with pytest.raises(ShapeMismatchError, match="positions"):  # N disagrees
        chunked.chunked_token_loss(hidden, head, teacher_hidden=teacher[0][:-1], teacher_head=teacher[1])
    with pytest.raises(ShapeMismatchError, match="classes"):  # V disagrees between the heads
        chunked.chunked_token_loss(hidden, head, teacher_hidden=teacher[0], teacher_head=teacher[1][:-1])
    with pytest.raises(ShapeMismatchError, match="student hidden"):  # hidden size vs head
        chunked.chunked_token_loss(hidden[:, :-1], head, teacher_logprobs=logprobs)
    with pytest.raises(ShapeMismatchError, match="teacher hidden"):
        chunked.chunked_token_loss(hidden, head, teacher_hidden=teacher[0][:, :-1], teacher_head=teacher[1])
    with pytest.raises(ShapeMismatchError, match="teacher log-probs"):  # dense log-probs: N or V disagree
        chunked.chunked_token_loss(hidden, head, teacher_logprobs=logprobs[:, :-1])
    with pytest.raises(ShapeMismatchError, match="teacher log-probs"):
        chunked.chunked_token_loss(hidden, head, teacher_logprobs=logprobs[:-1])
    values, ids = logprobs.topk(3, dim=-1)
    with pytest.raises(ShapeMismatchError, match="sparse"):
        chunked.chunked_token_loss(hidden, head, teacher_logprobs=values[:-1], token_ids=ids[:-1])
    with pytest.raises(ShapeMismatchError, match="ids"):
        chunked.chunked_token_loss(hidden, head, teacher_logprobs=values, token_ids=ids[:, :2])
    with pytest.raises(ShapeMismatchError, match="bias"):
        chunked.chunked_token_loss(hidden, head, student_bias=student[2][:-1], teacher_logprobs=logprobs)
    with pytest.raises(ShapeMismatchError, match="weights"):
        chunked.chunked_token_loss(hidden, head, teacher_logprobs=logprobs, weights=torch.ones(N + 1))


def test_argument_errors():
    student, teacher = models(seed=8)
    hidden, head = student[0], student[1]
    logprobs = F.log_softmax(F.linear(*teacher), -1)
    with pytest.raises(ValueError, match="either"):
        chunked.chunked_token_loss(hidden, head)
    with pytest.raises(ValueError, match="either"):
        chunked.chunked_token_loss(
            hidden, head, teacher_hidden=teacher[0], teacher_head=teacher[1], teacher_logprobs=logprobs
        )
    with pytest.raises(ValueError, match="token_ids"):
        chunked.chunked_token_loss(
            hidden, head, teacher_hidden=teacher[0], teacher_head=teacher[1], token_ids=torch.zeros(N, 2).long()
        )
    with pytest.raises(ValueError, match="unknown divergence"):
        chunked.chunked_token_loss(hidden, head, teacher_logprobs=logprobs, divergence="kl")
    with pytest.raises(ValueError, match="chunk_size"):
        chunked.chunked_token_loss(hidden, head, teacher_logprobs=logprobs, chunk_size=0)
    with pytest.raises(ValueError, match="raw logits"):
        chunked.chunked_token_loss(
            hidden, head, teacher_hidden=teacher[0], teacher_head=teacher[1], teacher_temperature=2.0
        )


@pytest.mark.parametrize("chunk", [3, 64])
def test_kd_and_ce_from_one_pass_equal_the_separate_losses(chunk):
    from distill.chunked import chunked_kd_and_ce
    from distill.losses import hard_label_ce

    g = torch.Generator().manual_seed(21)
    hidden = torch.randn(10, 6, generator=g)
    head = torch.randn(9, 6, generator=g)
    teacher = F.log_softmax(torch.randn(10, 9, generator=g), -1)
    labels = torch.tensor([1, -100, 3, 8, -100, 0, 2, -100, 5, 7])
    h1, w1 = hidden.clone().requires_grad_(True), head.clone().requires_grad_(True)
    kd, ce = chunked_kd_and_ce(
        h1, w1, teacher_logprobs=teacher, labels=labels, temperature=2.0, teacher_temperature=1.0, chunk_size=chunk
    )
    (0.3 * kd + 0.7 * ce).backward()
    h2, w2 = hidden.clone().requires_grad_(True), head.clone().requires_grad_(True)
    logits = h2 @ w2.T
    kd_ref = losses.LOSSES["forward_kl"](logits, teacher, temperature=2.0)
    ce_ref = hard_label_ce(logits, labels)
    (0.3 * kd_ref + 0.7 * ce_ref).backward()
    assert torch.allclose(kd, kd_ref, atol=1e-6) and torch.allclose(ce, ce_ref, atol=1e-6)
    assert torch.allclose(h1.grad, h2.grad, atol=1e-6) and torch.allclose(w1.grad, w2.grad, atol=1e-6)
