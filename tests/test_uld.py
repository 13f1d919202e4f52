"""The Universal Logit Distillation loss (Boizard et al. 2024) and empty (-1) entries of a sparse teacher."""

from typing import get_args

import pytest
import torch
import torch.nn.functional as F

from distill import chunked, losses
from distill.config import Divergence
from distill.errors import ShapeMismatchError

N, H, V = 7, 5, 11
BUCKET_LOSSES = ["forward_kl", "reverse_kl", "jsd", "tvd"]


def logits(n=N, v=V, seed=0, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, v, generator=g) * scale


def student_model(seed=0, n=N, v=V):
    """Student hidden (N, H) and head (V, H) that require grad."""
    g = torch.Generator().manual_seed(seed)
    hidden, head = torch.randn(n, H, generator=g), torch.randn(v, H, generator=g) * 0.7
    return hidden.requires_grad_(True), head.requires_grad_(True)


def value_and_grad(loss_fn, *inputs):
    leaves = [x.detach().clone().requires_grad_(True) for x in inputs]
    value = loss_fn(*leaves)
    return value.detach(), torch.autograd.grad(value, leaves)


def assert_same(got, expected, atol=1e-7):
    (got_value, got_grads), (value, grads) = got, expected
    assert torch.allclose(got_value, value, rtol=1e-6, atol=atol), (got_value, value)
    for a, b in zip(got_grads, grads):
        assert torch.isfinite(a).all()
        assert torch.allclose(a, b, rtol=1e-5, atol=atol), (a - b).abs().max()


# ----------------------------------------------------------------------------------------------------------------
# Empty entries (-1) of a sparse teacher
# ----------------------------------------------------------------------------------------------------------------


def padded_teacher(temperature=1.0, k=3, pad=3, seed=1, fill=losses.LOG_FLOOR):
    """A top-k teacher (N, k) and the same with `pad` empty entries (-1 ids) shuffled in among them (N, k + pad)."""
    values, ids = F.log_softmax(logits(seed=seed) / temperature, -1).topk(k, dim=-1)  # (N, k)
    padded_values = torch.cat([values, torch.full((N, pad), fill)], -1)  # (N, k+pad)
    padded_ids = torch.cat([ids, torch.full((N, pad), -1)], -1)  # (N, k+pad)
    g = torch.Generator().manual_seed(seed + 100)
    order = torch.stack([torch.randperm(k + pad, generator=g) for _ in range(N)])  # (N, k+pad)
    return (values, ids), (padded_values.gather(-1, order), padded_ids.gather(-1, order))


@pytest.mark.parametrize("name", BUCKET_LOSSES)
@pytest.mark.parametrize("mask", [None, torch.tensor([1, 0, 1, 1, 0, 1, 1], dtype=torch.bool)])
@pytest.mark.parametrize("fill", [losses.LOG_FLOOR, -0.5])  # an empty entry's log-prob is never read
def test_empty_entries_change_nothing(name, mask, fill):
    t = 2.0
    (values, ids), (padded_values, padded_ids) = padded_teacher(temperature=t, fill=fill)
    loss = losses.LOSSES[name]

    def with_ids(teacher, token_ids):
        return lambda s: loss(s, teacher, token_ids=token_ids, temperature=t, teacher_temperature=t, mask=mask)

    student = logits(seed=2)
    expected = value_and_grad(with_ids(values, ids), student)
    assert float(expected[0]) > 1e-3
    assert_same(value_and_grad(with_ids(padded_values, padded_ids), student), expected)


@pytest.mark.parametrize("name", BUCKET_LOSSES)
def test_empty_entries_change_nothing_chunked(name):
    t = 1.5
    (values, ids), (padded_values, padded_ids) = padded_teacher(temperature=t, pad=2, seed=3)
    weights = torch.tensor([1.0, 0.5, 0.0, 1.0, 2.0, 1.0, 1.0])

    def with_ids(teacher, token_ids):
        def loss(hidden, head):
            kd, _ = chunked.chunked_kd_and_ce(
                hidden, head, teacher_logprobs=teacher, token_ids=token_ids, divergence=name, temperature=t,
                teacher_temperature=t, weights=weights, chunk_size=3,
            )  # fmt: skip
            return kd

        return loss

    hidden, head = student_model(seed=4)
    expected = value_and_grad(with_ids(values, ids), hidden, head)
    assert float(expected[0]) > 1e-3
    assert_same(value_and_grad(with_ids(padded_values, padded_ids), hidden, head), expected)
    direct = value_and_grad(
        lambda h, w: losses.LOSSES[name](h @ w.T, values, token_ids=ids, temperature=t, teacher_temperature=t,
                                         mask=weights),
        hidden, head,
    )  # fmt: skip
    assert_same(expected, direct, atol=1e-6)


def test_all_empty_row_puts_the_whole_teacher_mass_in_the_tail():
    student_logits = logits(n=2, seed=5)
    (values, ids), _ = padded_teacher()
    teacher = torch.stack([torch.full((3,), losses.LOG_FLOOR), values[0]])  # (2, 3), row 0 all empty
    token_ids = torch.stack([torch.full((3,), -1), ids[0]])  # (2, 3)
    student, teacher_buckets = losses.sparse_pair(student_logits, teacher, token_ids, temperature=1.0)
    assert (teacher_buckets[0, :3] == losses.LOG_FLOOR).all() and (student[0, :3] == losses.LOG_FLOOR).all()
    assert abs(float(teacher_buckets[0, 3])) < 1e-6  # log 1: the whole teacher mass
    assert abs(float(student[0, 3])) < 1e-6  # the student's tail is all its classes
    for name in BUCKET_LOSSES:
        per_row = losses.LOSSES[name](student_logits, teacher, token_ids=token_ids, mask=torch.tensor([True, False]))
        assert abs(float(per_row)) < 1e-6


def test_repeated_empty_entries_mark_no_class():
    """Several -1 in a row, beside a real id 0 and the largest id: the tail keeps every other class."""
    student_logits = logits(n=1, seed=6)
    token_ids = torch.tensor([[-1, 0, -1, V - 1, -1]])
    teacher = torch.tensor([[losses.LOG_FLOOR, -1.0, losses.LOG_FLOOR, -2.0, losses.LOG_FLOOR]])
    student, _ = losses.sparse_pair(student_logits, teacher, token_ids, temperature=1.0)
    log_q = F.log_softmax(student_logits, -1)
    assert torch.allclose(student[0, 4 + 1], torch.logsumexp(log_q[0, 1 : V - 1], -1), atol=1e-6)
    assert torch.allclose(student[0, [1, 3]], log_q[0, [0, V - 1]])


def test_invalid_ids_fail():
    student_logits = logits()
    teacher = torch.full((N, 2), -1.0)
    with pytest.raises(ShapeMismatchError, match="outside"):
        losses.forward_kl(student_logits, teacher, token_ids=torch.full((N, 2), V))
    with pytest.raises(ShapeMismatchError, match="invalid"):
        losses.forward_kl(student_logits, teacher, token_ids=torch.full((N, 2), -2))


# ----------------------------------------------------------------------------------------------------------------
# ULD
# ----------------------------------------------------------------------------------------------------------------


def brute_force_uld(student_logits, teacher_logprobs, temperature, mask=None):
    """Both distributions fully sorted in decreasing order, the shorter padded with zeros, |differences| summed;
    in float64."""
    q = torch.softmax(student_logits.double() / temperature, -1).sort(-1, descending=True).values  # (N, V)
    p = teacher_logprobs.double().exp().sort(-1, descending=True).values  # (N, K)
    width = max(q.shape[-1], p.shape[-1])
    rows = (F.pad(q, (0, width - q.shape[-1])) - F.pad(p, (0, width - p.shape[-1]))).abs().sum(-1)  # (N,)
    if mask is None:
        return rows.mean()
    weights = mask.double()
    return (rows * weights).sum() / weights.sum().clamp_min(1.0)


def teacher_of_width(width, k=None, seed=7, temperature=1.0):
    """The log-probs of a teacher with `width` classes at `temperature`, all of them or its top k (unsorted)."""
    logprobs = F.log_softmax(logits(v=width, seed=seed) / temperature, -1)  # (N, width)
    if k is not None:
        logprobs = logprobs.topk(k, dim=-1).values  # (N, k)
    g = torch.Generator().manual_seed(seed)
    return logprobs[:, torch.randperm(logprobs.shape[-1], generator=g)]  # any order


@pytest.mark.parametrize(
    ("width", "k"),
    [(17, 4), (17, V), (V, V), (V, None), (17, 15), (17, None), (6, None)],  # K < V, K == V, K > V; full or top-K
)
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_uld_equals_brute_force(width, k, temperature):
    teacher = teacher_of_width(width, k, temperature=temperature)
    student = logits(seed=8)
    got = value_and_grad(lambda s: losses.uld(s, teacher, temperature=temperature, teacher_temperature=temperature),
                         student)  # fmt: skip
    ref = value_and_grad(lambda s: brute_force_uld(s, teacher, temperature), student.double())
    assert float(ref[0]) > 1e-2
    assert torch.allclose(got[0].double(), ref[0], atol=1e-6), (got[0], ref[0])
    assert torch.allclose(got[1][0].double(), ref[1][0], atol=1e-6)


def test_uld_is_zero_when_sorted_probabilities_agree():
    student = logits(seed=9)
    t = 2.0
    perm = torch.randperm(V, generator=torch.Generator().manual_seed(1))
    teacher = F.log_softmax(student / t, -1)[:, perm]  # another vocabulary's order, the same sorted probabilities
    s = student.clone().requires_grad_(True)
    value = losses.uld(s, teacher, temperature=t, teacher_temperature=t)
    assert abs(float(value.detach())) < 1e-6
    assert torch.isfinite(torch.autograd.grad(value, s)[0]).all()
    padded = torch.cat([teacher, torch.full((N, 4), losses.LOG_FLOOR)], -1)  # zero-probability extra classes
    assert abs(float(losses.uld(student, padded, temperature=t, teacher_temperature=t))) < 1e-6


def test_uld_is_invariant_to_permuting_the_teacher():
    student, teacher = logits(seed=10), teacher_of_width(19, 6, seed=11)
    base = losses.uld(student, teacher)
    for seed in range(3):
        perm = torch.stack([torch.randperm(6, generator=torch.Generator().manual_seed(seed + i)) for i in range(N)])
        assert torch.allclose(losses.uld(student, teacher.gather(-1, perm)), base, atol=1e-7)


def test_uld_mask_weights_rows():
    student, teacher = logits(seed=12), teacher_of_width(15, 5, seed=13)
    mask = torch.tensor([1, 0, 1, 1, 0, 0, 1], dtype=torch.bool)
    assert torch.allclose(losses.uld(student, teacher, mask=mask), losses.uld(student[mask], teacher[mask]))
    weights = torch.tensor([1.0, 0.0, 2.0, 0.5, 0.0, 1.0, 3.0])
    expected = brute_force_uld(student, teacher, 1.0, mask=weights)
    assert torch.allclose(losses.uld(student, teacher, mask=weights).double(), expected, atol=1e-6)
    assert float(losses.uld(student, teacher, mask=torch.zeros(N))) == 0.0


@pytest.mark.parametrize("same", [False, True])
def test_uld_gradient_is_finite_with_a_peaked_teacher(same):
    teacher = torch.full((N, 8), losses.LOG_FLOOR)
    teacher[:, 0] = 0.0  # all the mass on one token; the others at the floor
    student = torch.full((N, V), -50.0)
    student[:, 3] = 50.0 if same else -60.0  # peaked like the teacher, or peaked elsewhere with ties
    student = student.requires_grad_(True)
    value = losses.uld(student, teacher)
    (grad,) = torch.autograd.grad(value, student)
    assert torch.isfinite(value) and torch.isfinite(grad).all()
    assert float(value.detach()) < 1e-6 if same else float(value.detach()) > 0.5


def test_uld_teacher_temperature():
    student = logits(seed=14)
    full = F.log_softmax(logits(v=9, seed=15), -1)  # a full teacher distribution at temperature 1
    at_t = F.log_softmax(logits(v=9, seed=15) / 3.0, -1)
    rescaled = losses.uld(student, full, temperature=3.0, teacher_temperature=1.0)
    assert torch.allclose(rescaled, losses.uld(student, at_t, temperature=3.0, teacher_temperature=3.0), atol=1e-6)
    with pytest.raises(ShapeMismatchError, match="rescaled"):  # a top-K's tail at another temperature is unknown
        losses.uld(student, full.topk(3, dim=-1).values, temperature=3.0, teacher_temperature=1.0)


def test_uld_ignores_ids_and_checks_shapes():
    student, teacher = logits(seed=16), teacher_of_width(V, 4, seed=17)
    ids = torch.randint(0, V, (N, 4), generator=torch.Generator().manual_seed(0))
    assert torch.equal(losses.uld(student, teacher, token_ids=ids), losses.uld(student, teacher))
    with pytest.raises(ShapeMismatchError, match="ids"):
        losses.uld(student, teacher, token_ids=ids[:, :3])
    with pytest.raises(ShapeMismatchError, match="teacher outputs"):
        losses.uld(student, teacher[:-1])


@pytest.mark.parametrize("k", [4, V, 23])
@pytest.mark.parametrize("weights", [None, torch.tensor([1.0, 0.0, 1.0, 2.0, 0.5, 1.0, 0.0])])
def test_uld_chunked_equals_direct(k, weights):
    hidden, head = student_model(seed=18)
    teacher = teacher_of_width(max(k, 17), k, seed=19, temperature=2.0)  # (N, k), a vocabulary of its own
    got = value_and_grad(
        lambda h, w: chunked.chunked_kd_and_ce(
            h, w, teacher_logprobs=teacher, divergence="uld", temperature=2.0, teacher_temperature=2.0,
            weights=weights, chunk_size=3,
        )[0],
        hidden, head,
    )  # fmt: skip
    direct = value_and_grad(
        lambda h, w: losses.uld(h @ w.T, teacher, temperature=2.0, teacher_temperature=2.0, mask=weights),
        hidden, head,
    )  # fmt: skip
    assert float(direct[0]) > 1e-2
    assert_same(got, direct, atol=1e-6)


def test_uld_chunked_with_a_teacher_head_of_another_vocabulary():
    hidden, head = student_model(seed=20)
    g = torch.Generator().manual_seed(21)
    teacher_hidden, teacher_head = torch.randn(N, 9, generator=g), torch.randn(19, 9, generator=g)  # V_t = 19
    got = value_and_grad(
        lambda h, w: chunked.chunked_token_loss(
            h, w, teacher_hidden=teacher_hidden, teacher_head=teacher_head, divergence="uld", temperature=1.5,
            chunk_size=2,
        ),
        hidden, head,
    )  # fmt: skip
    teacher = F.log_softmax(teacher_hidden @ teacher_head.T, -1)  # (N, 19)
    direct = value_and_grad(lambda h, w: losses.uld(h @ w.T, teacher, temperature=1.5), hidden, head)
    assert_same(got, direct, atol=1e-6)
    with pytest.raises(ShapeMismatchError, match="classes"):  # other divergences still need the student's classes
        chunked.chunked_token_loss(hidden, head, teacher_hidden=teacher_hidden, teacher_head=teacher_head)
    with pytest.raises(ShapeMismatchError, match="teacher log-probs"):
        chunked.chunked_token_loss(hidden, head, teacher_logprobs=teacher)
    with pytest.raises(ShapeMismatchError, match="positions"):
        chunked.chunked_token_loss(
            hidden, head, teacher_hidden=teacher_hidden[:-1], teacher_head=teacher_head, divergence="uld"
        )


def test_config_accepts_every_divergence():
    assert set(get_args(Divergence)) == set(losses.LOSSES)
