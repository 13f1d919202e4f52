"""The closed-form gradients of `distill.closed_form` equal autograd through the reference losses
(`distill.losses.forward_kl` on sparse buckets, `hard_label_ce`): empty entries, a teacher covering every class, a
tiny tail, a temperature, extreme logits, and ids outside the vocabulary refused."""

import pytest
import torch
import torch.nn.functional as F

from distill import closed_form, losses
from distill.errors import ShapeMismatchError

torch.set_num_threads(1)

S, V = 9, 13


def reference(logits, teacher, ids, row_scale, temperature):
    """sum_i row_scale_i KL_i and its gradient, by autograd through `losses.forward_kl` row by row."""
    z = logits.clone().requires_grad_(True)
    value = sum(
        row_scale[i] * losses.forward_kl(z[i : i + 1], teacher[i : i + 1], token_ids=ids[i : i + 1],
                                         temperature=temperature, teacher_temperature=temperature)
        for i in range(len(z))
    )  # fmt: skip
    (grad,) = torch.autograd.grad(value, z)
    return value.detach(), grad


def closed(logits, teacher, ids, row_scale, temperature):
    buffer = logits.clone()
    value = closed_form.sparse_forward_kl_grad(buffer, teacher, ids, row_scale, temperature)
    return value, buffer


def case(seed, k, temperature=1.0, spread=2.0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(S, V, generator=g) * spread
    teacher = F.log_softmax(torch.randn(S, V, generator=g) * spread / temperature, -1).topk(k, -1)
    row_scale = torch.rand(S, generator=g)
    return logits, teacher.values, teacher.indices, row_scale


@pytest.mark.parametrize("k, temperature", [(1, 1.0), (4, 1.0), (4, 0.5), (V, 1.0), (V - 1, 2.0)])
def test_value_and_gradient_equal_autograd(k, temperature):
    logits, teacher, ids, row_scale = case(seed=k, k=k, temperature=temperature)
    value, grad = closed(logits, teacher, ids, row_scale, temperature)
    expected_value, expected_grad = reference(logits, teacher, ids, row_scale, temperature)
    assert torch.allclose(value, expected_value, rtol=1e-5, atol=1e-6)
    assert torch.allclose(grad, expected_grad, rtol=1e-4, atol=1e-6), (grad - expected_grad).abs().max()
    assert float(grad.abs().sum()) > 0


def test_empty_entries_change_nothing():
    logits, teacher, ids, row_scale = case(seed=7, k=5)
    padded_ids = torch.cat([ids, torch.full((S, 2), -1)], -1)  # two empty entries per row
    padded = torch.cat([teacher, torch.full((S, 2), losses.LOG_FLOOR)], -1)
    padded_ids[0, 0], padded[0, 0] = -1, losses.LOG_FLOOR  # and one in place of a real id
    value, grad = closed(logits, padded, padded_ids, row_scale, 1.0)
    expected_value, expected_grad = reference(logits, padded, padded_ids, row_scale, 1.0)
    assert torch.allclose(value, expected_value, rtol=1e-5, atol=1e-6)
    assert torch.allclose(grad, expected_grad, rtol=1e-4, atol=1e-6)


def test_a_tiny_student_tail_keeps_its_precision():
    """A student whose top classes hold all but 1e-9 of its mass: the tail's log-prob is that of the exact sum over
    the tail's classes, not of 1 - sum(top) rounded in float32 (which would be 0 or 6e-8)."""
    logits, teacher, ids, row_scale = case(seed=2, k=3)
    logits = torch.full((S, V), -30.0)
    logits.scatter_(-1, ids, 0.0)  # the teacher's three ids hold the student's mass; the rest e^-30 each
    value, grad = closed(logits, teacher, ids, row_scale, 1.0)
    expected_value, expected_grad = reference(logits, teacher, ids, row_scale, 1.0)
    assert torch.allclose(value, expected_value, rtol=1e-4)
    assert torch.allclose(grad, expected_grad, rtol=1e-4, atol=1e-7)


def test_extreme_logits_stay_finite():
    logits, teacher, ids, row_scale = case(seed=4, k=4, spread=1e4)
    value, grad = closed(logits, teacher, ids, row_scale, 1.0)
    assert torch.isfinite(value) and torch.isfinite(grad).all()


def test_ids_outside_the_vocabulary_are_refused():
    logits, teacher, ids, row_scale = case(seed=5, k=4)
    ids[2, 1] = V
    with pytest.raises(ShapeMismatchError, match="outside"):
        closed(logits, teacher, ids, row_scale, 1.0)
    ids[2, 1] = -2
    with pytest.raises(ShapeMismatchError, match="invalid"):
        closed(logits, teacher, ids, row_scale, 1.0)
    with pytest.raises(ShapeMismatchError):
        closed(logits, teacher[:, :3], ids, row_scale, 1.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cross_entropy_gradient_equals_autograd(dtype):
    g = torch.Generator().manual_seed(9)
    logits = torch.randn(S, V, generator=g) * 3
    labels = torch.randint(0, V, (S,), generator=g)
    labels[::3] = -100
    grad = torch.empty(S, V, dtype=dtype)
    value = closed_form.cross_entropy_grad(logits, labels, grad, 0.25)
    z = logits.clone().requires_grad_(True)
    expected = 0.25 * F.cross_entropy(z, labels, ignore_index=-100, reduction="sum")
    (expected_grad,) = torch.autograd.grad(expected, z)
    assert torch.allclose(value, expected.detach(), rtol=1e-5)
    tolerance = 1e-6 if dtype == torch.float32 else 1e-2
    assert torch.allclose(grad.float(), expected_grad, rtol=tolerance, atol=tolerance)
    assert float(grad[::3].abs().sum()) == 0.0  # rows without a label get no gradient


def dense_reference(logits, teacher, row_scale, temperature):
    """sum_i row_scale_i KL_i against a dense teacher and its gradient, by autograd through `losses.forward_kl`."""
    z = logits.clone().requires_grad_(True)
    value = sum(
        row_scale[i] * losses.forward_kl(z[i : i + 1], teacher[i : i + 1], temperature=temperature,
                                         teacher_temperature=temperature)
        for i in range(len(z))
    )  # fmt: skip
    (grad,) = torch.autograd.grad(value, z)
    return value.detach(), grad


@pytest.mark.parametrize("temperature, spread", [(1.0, 2.0), (0.5, 2.0), (2.0, 2.0), (1.0, 30.0)])
def test_dense_value_and_gradient_equal_autograd(temperature, spread):
    g = torch.Generator().manual_seed(int(spread))
    logits = torch.randn(S, V, generator=g) * spread
    teacher = F.log_softmax(torch.randn(S, V, generator=g) * spread / temperature, -1)
    row_scale = torch.rand(S, generator=g)
    buffer = logits.clone()
    value = closed_form.dense_forward_kl_grad(buffer, teacher, row_scale, temperature)
    expected_value, expected_grad = dense_reference(logits, teacher, row_scale, temperature)
    assert torch.allclose(value, expected_value, rtol=1e-5, atol=1e-5)
    assert torch.allclose(buffer, expected_grad, rtol=1e-4, atol=1e-6), (buffer - expected_grad).abs().max()
    assert float(buffer.abs().sum()) > 0


def test_dense_student_equal_to_teacher_has_zero_loss_and_gradient():
    logits = torch.randn(S, V, generator=torch.Generator().manual_seed(3)) * 4
    buffer = logits.clone()
    value = closed_form.dense_forward_kl_grad(buffer, F.log_softmax(logits, -1), torch.ones(S), 1.0)
    assert abs(float(value)) < 1e-5
    assert float(buffer.abs().max()) < 1e-6


def test_dense_teacher_of_another_width_is_refused():
    logits = torch.randn(S, V)
    with pytest.raises(ShapeMismatchError, match="teacher outputs"):
        closed_form.dense_forward_kl_grad(logits, F.log_softmax(torch.randn(S, V + 1), -1), torch.ones(S), 1.0)
