import math

import pytest
import torch
import torch.nn.functional as F

from distill import losses
from distill.errors import ShapeMismatchError

NAMES = sorted(losses.LOSSES)


def pair(n=6, v=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, v, generator=g) * 2, torch.randn(n, v, generator=g) * 2


def topk(teacher_logits, k, temperature=1.0):
    logprobs = F.log_softmax(teacher_logits / temperature, -1)
    values, ids = logprobs.topk(k, dim=-1)
    return values, ids


@pytest.mark.parametrize("name", NAMES)
def test_zero_when_student_equals_teacher(name):
    student, _ = pair()
    teacher_logprobs = F.log_softmax(student, -1)
    value = losses.LOSSES[name](student, teacher_logprobs, temperature=3.0)
    assert abs(float(value)) < 1e-6


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("temperature", [0.5, 1.0, 4.0])
def test_non_negative_and_positive_when_different(name, temperature):
    student, teacher = pair(seed=3)
    value = losses.LOSSES[name](student, F.log_softmax(teacher, -1), temperature=temperature)
    assert float(value) > 1e-4


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("k_equals_v_temperature", [1.0, 2.5])
def test_sparse_equals_dense_when_k_is_v(name, k_equals_v_temperature):
    t = k_equals_v_temperature
    student, teacher = pair(n=5, v=9, seed=1)
    s1 = student.clone().requires_grad_(True)
    s2 = student.clone().requires_grad_(True)
    dense = losses.LOSSES[name](s1, F.log_softmax(teacher, -1), temperature=t, beta=0.3)
    values, ids = topk(teacher, 9, temperature=t)
    sparse = losses.LOSSES[name](s2, values, token_ids=ids, temperature=t, teacher_temperature=t, beta=0.3)
    assert torch.allclose(dense, sparse, atol=1e-6), (dense, sparse)
    dense.backward()
    sparse.backward()
    assert torch.isfinite(s2.grad).all()
    assert torch.allclose(s1.grad, s2.grad, atol=1e-6)


def test_sparse_tail_bucket_matches_hand_computation():
    student, teacher = pair(n=3, v=6, seed=2)
    values, ids = topk(teacher, 2)
    got = losses.forward_kl(student, values, token_ids=ids)
    log_q = F.log_softmax(student, -1)
    p_top = values.exp()
    q_top = log_q.gather(-1, ids).exp()
    p = torch.cat([p_top, 1 - p_top.sum(-1, keepdim=True)], -1)
    q = torch.cat([q_top, 1 - q_top.sum(-1, keepdim=True)], -1)
    expected = (p * (p.log() - q.log())).sum(-1).mean()
    assert torch.allclose(got, expected, atol=1e-5)


def test_sparse_needs_matching_temperature():
    student, teacher = pair()
    values, ids = topk(teacher, 3, temperature=2.0)
    with pytest.raises(ShapeMismatchError, match="temperature"):
        losses.forward_kl(student, values, token_ids=ids, temperature=1.0, teacher_temperature=2.0)


def test_sparse_ids_outside_vocabulary_fail():
    student, teacher = pair(v=5)
    with pytest.raises(ShapeMismatchError, match="outside"):
        losses.forward_kl(student, torch.full((6, 2), -1.0), token_ids=torch.full((6, 2), 7))


def test_dense_shape_mismatch_fails():
    with pytest.raises(ShapeMismatchError):
        losses.forward_kl(torch.randn(4, 5), torch.randn(4, 6))


def reference_forward_kl(student, teacher, t):
    """Straightforward reference: softmaxes, logs, sums, in float64."""
    p = torch.softmax(teacher.double() / t, -1)
    q = torch.softmax(student.double() / t, -1)
    return (p * torch.log(p / q)).sum(-1).mean()


@pytest.mark.parametrize("t", [1.0, 2.0, 5.0])
def test_forward_kl_value_and_gradient_against_reference(t):
    student, teacher = pair(seed=4)
    s = student.clone().requires_grad_(True)
    ours = losses.forward_kl(s, F.log_softmax(teacher, -1), temperature=t)
    ours.backward()
    r = student.double().clone().requires_grad_(True)
    ref = reference_forward_kl(r, teacher, t)
    ref.backward()
    assert math.isclose(float(ours.detach()), float(ref.detach()), rel_tol=1e-5, abs_tol=1e-7)
    assert torch.allclose(s.grad.double(), r.grad, atol=1e-6)
    # Closed form: d KL / d z_s = (q - p) / (T N)
    p = torch.softmax(teacher / t, -1)
    q = torch.softmax(student / t, -1)
    assert torch.allclose(s.grad, (q - p) / (t * student.shape[0]), atol=1e-6)


def test_reverse_kl_and_jsd_against_reference():
    student, teacher = pair(seed=5)
    p = torch.softmax(teacher.double(), -1)
    q = torch.softmax(student.double(), -1)
    reverse = (q * torch.log(q / p)).sum(-1).mean()
    assert math.isclose(float(losses.reverse_kl(student, F.log_softmax(teacher, -1))), float(reverse), rel_tol=1e-5)
    beta = 0.3
    m = beta * p + (1 - beta) * q
    jsd = (beta * (p * torch.log(p / m)).sum(-1) + (1 - beta) * (q * torch.log(q / m)).sum(-1)).mean()
    got = losses.jsd(student, F.log_softmax(teacher, -1), beta=beta)
    assert math.isclose(float(got), float(jsd), rel_tol=1e-5)
    tvd = 0.5 * (p - q).abs().sum(-1).mean()
    assert math.isclose(float(losses.tvd(student, F.log_softmax(teacher, -1))), float(tvd), rel_tol=1e-5)


def test_jsd_ends_are_forward_and_reverse_kl():
    student, teacher = pair(seed=6)
    t = F.log_softmax(teacher, -1)
    assert torch.allclose(losses.jsd(student, t, beta=0.0), losses.forward_kl(student, t))
    assert torch.allclose(losses.jsd(student, t, beta=1.0), losses.reverse_kl(student, t))
    symmetric = losses.jsd(student, t, beta=0.5)
    assert 0 < float(symmetric) <= math.log(2) + 1e-6


@pytest.mark.parametrize("beta", [0.1, 0.5, 0.9])
def test_jsd_closed_form_gradient_matches_autograd_of_the_formula(beta):
    student, teacher = pair(n=5, v=9, seed=8)
    log_p = F.log_softmax(teacher.double(), -1).requires_grad_(True)
    log_q = F.log_softmax(student.double(), -1).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b: losses.jsd_rows(a, b, beta), (log_p, log_q))
    # Against autograd through the mixture's log-sum-exp and both KLs (the formula as written in GKD).
    a, b = log_p.detach().clone().requires_grad_(True), log_q.detach().clone().requires_grad_(True)
    log_m = torch.logsumexp(torch.stack([a + math.log(beta), b + math.log(1 - beta)]), dim=0)
    reference = beta * losses.kl_rows(a, log_m) + (1 - beta) * losses.kl_rows(b, log_m)
    weights = torch.rand(5, dtype=torch.float64)
    (reference * weights).sum().backward()
    got = losses.jsd_rows(log_p, log_q, beta)
    (got * weights).sum().backward()
    assert torch.allclose(got, reference, atol=1e-12)
    assert torch.allclose(log_p.grad, a.grad, atol=1e-12) and torch.allclose(log_q.grad, b.grad, atol=1e-12)


def test_jsd_stays_finite_where_probabilities_underflow():
    log_p = torch.tensor([[0.0, -1000.0, losses.LOG_FLOOR], [-0.5, -0.9, -1e4]])  # (2, 3), float32
    log_q = torch.tensor([[-1e4, 0.0, -300.0], [-0.9, -0.5, -1e4]]).requires_grad_(True)
    rows = losses.jsd_rows(log_p, log_q, 0.5)
    rows.sum().backward()
    assert torch.isfinite(rows).all() and torch.isfinite(log_q.grad).all()
    assert 0 < float(rows[0].detach()) <= math.log(2) + 1e-6  # disjoint supports: the largest JSD


def test_hinton_t_squared_scaling():
    student, teacher = pair(seed=7)
    t = F.log_softmax(teacher, -1)
    for temperature in (1.0, 2.0, 8.0):
        terms = losses.hinton_terms(student, t, None, temperature=temperature)
        kl = losses.forward_kl(student, t, temperature=temperature)
        assert torch.allclose(terms["kd"], kl * temperature**2)
    # The T^2 factor keeps the soft-target gradient's size roughly independent of T (Hinton et al. 2015, sec. 2):
    # for large T the gradient tends to (z_s - z_t) / (N V) after centring.
    s = student.clone().requires_grad_(True)
    losses.hinton_terms(s, t, None, temperature=1000.0)["kd"].backward()
    zs, zt = student - student.mean(-1, keepdim=True), teacher - teacher.mean(-1, keepdim=True)
    approx = (zs - zt) / (student.shape[-1] * student.shape[0])
    assert torch.allclose(s.grad, approx, atol=5e-4)  # the error shrinks as 1/T


def test_hinton_gradient_equals_soft_cross_entropy_gradient():
    student, teacher = pair(seed=8)
    labels = torch.tensor([0, 1, -100, 3, -100, 2])
    alpha, temperature = 0.7, 3.0
    s = student.clone().requires_grad_(True)
    losses.hinton_loss(s, F.log_softmax(teacher, -1), labels, temperature=temperature, alpha=alpha).backward()
    r = student.clone().requires_grad_(True)
    p = torch.softmax(teacher / temperature, -1)
    soft_ce = -(p * F.log_softmax(r / temperature, -1)).sum(-1).mean() * temperature**2
    keep = labels != -100
    hard = F.cross_entropy(r[keep], labels[keep])
    (alpha * soft_ce + (1 - alpha) * hard).backward()
    assert torch.allclose(s.grad, r.grad, atol=1e-6)


def test_hard_label_term_ignores_unlabeled_rows():
    student = torch.randn(4, 3)
    assert float(losses.hard_label_ce(student, torch.full((4,), -100))) == 0.0
    labels = torch.tensor([0, -100, 2, -100])
    expected = F.cross_entropy(student[[0, 2]], labels[[0, 2]])
    assert torch.allclose(losses.hard_label_ce(student, labels), expected)


def test_mask_selects_rows():
    student, teacher = pair(seed=9)
    t = F.log_softmax(teacher, -1)
    mask = torch.tensor([1, 0, 1, 0, 0, 1], dtype=torch.bool)
    assert torch.allclose(losses.forward_kl(student, t, mask=mask), losses.forward_kl(student[mask], t[mask]))


def test_teacher_temperature_rescales_dense_logprobs():
    student, teacher = pair(seed=10)
    at_two = F.log_softmax(teacher / 2.0, -1)
    direct = losses.forward_kl(student, F.log_softmax(teacher, -1), temperature=3.0)
    rescaled = losses.forward_kl(student, at_two, temperature=3.0, teacher_temperature=2.0)
    assert torch.allclose(direct, rescaled, atol=1e-6)
