"""A live LM teacher inside the chunked loss (`distill.teachers.lm_head`): its log-probs formed chunk by chunk from
its final hidden states equal its dense log-probs; `lm_terms` with it equals the dense teacher's terms and
gradients (forward KL, reverse KL, JSD, on-policy) without ever building them; a teacher of another tokenizer gets
the same top-k; a model without a reachable head falls back to its full log-probs; a cache scored chunk by chunk
equals the one scored from full logits."""

import pytest
import torch
from torch import nn

from conftest import tiny_gpt2
from distill.config import LossConfig
from distill.errors import ShapeMismatchError
from distill.lm import lm_terms
from distill.lm_data import Example, tokenize_examples
from distill.teachers import TeacherOutput
from distill.teachers.cross import CrossTokenizerTeacher
from distill.teachers.lm_head import chunked_top_k, head_parts, top_k_scorer
from distill.teachers.local import LocalTeacher
from distill.teachers.token_cache import TokenCache, build_scored_cache, build_token_cache, causal_lm_logits
from distill.teachers.token_codec import Codec
from test_cross_tokenizer import EXAMPLES as CROSS_EXAMPLES
from test_cross_tokenizer import pair  # noqa: F401  (the fixture)

torch.set_num_threads(1)

EXAMPLES = [
    Example("q : the dog runs", "a : the dog plays"),
    Example("q : a great movie", "a : best film of the year"),
    Example("", "the cat is happy and the dog is sad"),
    Example("q : bad food", "a : very bad"),
]


class DenseOnly:
    """A teacher's full log-probs and nothing else: the path every teacher took before the chunked teacher."""

    def __init__(self, inner):
        self.inner, self.num_classes = inner, inner.num_classes
        self.calls = 0

    def __call__(self, batch):
        self.calls += 1
        return self.inner(batch)


class Spy(LocalTeacher):
    """A LocalTeacher that counts the calls of its full path."""

    calls = 0

    def __call__(self, batch):
        Spy.calls += 1
        return super().__call__(batch)


def setup(teacher_seed=2):
    student, tokenizer = tiny_gpt2(seed=1)
    student.eval()  # no dropout: two passes see the same network
    teacher_model, _ = tiny_gpt2(layers=3, seed=teacher_seed)
    data = tokenize_examples(tokenizer, EXAMPLES)
    return student, teacher_model, tokenizer, data.batch(torch.arange(4))


def test_final_hidden_through_the_head_equals_the_dense_log_probs():
    _, teacher_model, tokenizer, batch = setup()
    teacher = LocalTeacher(teacher_model, len(tokenizer))
    found = teacher.final_hidden(batch)
    assert found is not None
    logits = torch.nn.functional.linear(found.hidden, found.weight, found.bias)  # (B, T, V)
    torch.testing.assert_close(torch.log_softmax(logits.float(), -1), teacher(batch).logprobs, atol=1e-5, rtol=1e-5)
    mask = batch["kd_mask"]
    values, ids = teacher.top_k_at(batch, mask.nonzero(), 5)
    expected = teacher(batch).logprobs[mask].topk(5, dim=-1)
    torch.testing.assert_close(values, expected.values, atol=1e-5, rtol=1e-5)
    assert torch.equal(ids, expected.indices)


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize("on_policy", [False, True])
def test_lm_terms_with_the_live_teacher_equal_its_dense_log_probs(divergence, on_policy):
    student, teacher_model, tokenizer, batch = setup()
    loss = LossConfig(temperature=2.0, alpha=0.6, chunk_size=5, divergence=divergence, beta=0.3)
    live = Spy(teacher_model, len(tokenizer))
    Spy.calls = 0
    terms, weights = lm_terms(student, batch, live, loss, on_policy=on_policy)
    assert Spy.calls == 0  # the full (B, T, V) log-probs were never built
    sum(weights[k] * terms[k] for k in terms).backward()
    grads = [p.grad.clone() for p in student.parameters()]
    student.zero_grad()
    dense = DenseOnly(LocalTeacher(teacher_model, len(tokenizer)))
    expected, _ = lm_terms(student, batch, dense, loss, on_policy=on_policy)
    sum(weights[k] * expected[k] for k in expected).backward()
    assert dense.calls == 1 and set(terms) == set(expected) == ({"kd"} if on_policy else {"kd", "ce"})
    for name in terms:
        torch.testing.assert_close(terms[name], expected[name], atol=1e-5, rtol=1e-5)
    for got, p in zip(grads, student.parameters()):
        torch.testing.assert_close(got, p.grad, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("live", [True, False])
def test_the_teacher_runs_before_the_student_so_their_activations_never_coexist(live):
    """The teacher's forward (live, chunked, or its full log-probs) is done before the student's starts: the
    teacher's transient activations are freed before the student's, kept for backward, exist."""
    student, teacher_model, tokenizer, batch = setup()
    order = []
    inner = LocalTeacher(teacher_model, len(tokenizer))
    teacher = inner if live else DenseOnly(inner)
    for model, name in ((teacher_model, "teacher"), (student, "student")):  # the base is called alone when live
        for module in (model, model.transformer):
            module.register_forward_pre_hook(lambda *_, name=name: order.append(name))
    lm_terms(student, batch, teacher, LossConfig(chunk_size=5))
    assert "teacher" in order and "student" in order, order
    assert order.index("student") > max(i for i, name in enumerate(order) if name == "teacher"), order


class NoHead(nn.Module):
    """A causal LM as a plain module: token ids in, logits out, no `get_output_embeddings`."""

    def __init__(self, vocab):
        super().__init__()
        self.embed, self.out = nn.Embedding(vocab, 8), nn.Linear(8, vocab)

    def forward(self, input_ids, attention_mask=None):
        return self.out(self.embed(input_ids))


def test_a_teacher_without_a_reachable_head_falls_back_to_its_full_log_probs():
    student, teacher_model, tokenizer, batch = setup()
    torch.manual_seed(0)
    plain = Spy(NoHead(len(tokenizer)), len(tokenizer))
    assert head_parts(plain.model) is None and plain.final_hidden(batch) is None
    Spy.calls = 0
    loss = LossConfig(temperature=1.0, alpha=0.5, chunk_size=4)
    terms, _ = lm_terms(student, batch, plain, loss)
    assert Spy.calls == 1 and torch.isfinite(terms["kd"])
    expected, _ = lm_terms(student, batch, DenseOnly(plain), loss)
    torch.testing.assert_close(terms["kd"], expected["kd"])
    # A model that transforms its logits after the head (Gemma 2's soft-capping) keeps the full path too.
    teacher_model.config.final_logit_softcapping = 30.0
    assert head_parts(teacher_model) is None
    assert LocalTeacher(teacher_model, len(tokenizer)).top_k_at(batch, torch.zeros(1, 2).long(), 3) is None
    teacher_model.config.final_logit_softcapping = None
    assert head_parts(teacher_model) is not None
    # A teacher whose head predicts another vocabulary is refused, as with its full log-probs.
    small, _ = tiny_gpt2(layers=1, seed=3)
    small.resize_token_embeddings(len(tokenizer) + 3)
    with pytest.raises(ShapeMismatchError, match="vocabulary has"):
        lm_terms(student, batch, LocalTeacher(small, len(tokenizer) + 3), loss)


def test_chunked_top_k_equals_the_full_top_k_and_tail():
    g = torch.Generator().manual_seed(0)
    hidden, weight, bias = (
        torch.randn(11, 6, generator=g),
        torch.randn(40, 6, generator=g),
        torch.randn(40, generator=g),
    )
    values, ids, tail = chunked_top_k(hidden, weight, bias, 7, temperature=1.5, chunk_size=4)
    logprobs = torch.log_softmax((hidden @ weight.T + bias) / 1.5, -1)  # (11, 40)
    expected = logprobs.topk(7, dim=-1)
    torch.testing.assert_close(values, expected.values)
    assert torch.equal(ids, expected.indices)
    torch.testing.assert_close(tail, torch.log1p(-expected.values.exp().sum(-1)), atol=1e-5, rtol=1e-5)
    full, _, empty = chunked_top_k(hidden, weight, bias, 99, chunk_size=3)  # k beyond V: all of them
    assert full.shape == (11, 40) and bool(torch.isneginf(empty).all())


def test_a_teacher_of_another_tokenizer_gets_the_same_top_k_chunk_by_chunk(pair):  # noqa: F811
    _, teacher, teacher_tok, student, student_tok = pair
    teacher_data = tokenize_examples(teacher_tok, CROSS_EXAMPLES, 48)
    data = tokenize_examples(student_tok, CROSS_EXAMPLES, 48)
    batch = data.batch(torch.arange(6))
    options = {"teacher_data": teacher_data, "max_length": 48, "top_k": 16}
    Spy.calls = 0
    live = CrossTokenizerTeacher(Spy(teacher, len(teacher_tok)), teacher_tok, student_tok, **options)
    dense = CrossTokenizerTeacher(
        DenseOnly(LocalTeacher(teacher, len(teacher_tok))), teacher_tok, student_tok, **options
    )
    got, expected = live(batch), dense(batch)
    assert Spy.calls == 0 and bool(got.mask.any())
    assert torch.equal(got.mask, expected.mask) and torch.equal(got.token_ids, expected.token_ids)
    torch.testing.assert_close(got.logprobs, expected.logprobs, atol=1e-5, rtol=1e-5)
    uld = CrossTokenizerTeacher(Spy(teacher, len(teacher_tok)), teacher_tok, student_tok, uld=True, **options)
    uld_dense = CrossTokenizerTeacher(DenseOnly(LocalTeacher(teacher, len(teacher_tok))), teacher_tok, student_tok,
                                      uld=True, **options)  # fmt: skip
    torch.testing.assert_close(uld(batch).logprobs, uld_dense(batch).logprobs, atol=1e-5, rtol=1e-5)
    assert isinstance(got, TeacherOutput) and Spy.calls == 0


def test_a_cache_scored_chunk_by_chunk_equals_the_full_logits_build(tmp_path):
    _, teacher_model, tokenizer, _ = setup()
    teacher_model.eval()
    data = tokenize_examples(tokenizer, EXAMPLES * 3)
    sequences = [s.numpy() for s in data.sequences]
    scored = [data.scored(i).numpy() for i in range(len(data))]
    identity = {"temperature": 2.0, "teacher_name": "t", "teacher_revision": "r", "tokenizer_hash": "h",
                "data_id": data.fingerprint(), "batch_size": 5}  # fmt: skip
    full = build_token_cache(causal_lm_logits(teacher_model), sequences, tmp_path / "full", scored=scored, top_k=6,
                             vocab_size=len(tokenizer), **identity)  # fmt: skip
    codec = Codec.for_sizes(6, len(tokenizer))
    score = top_k_scorer(teacher_model, sequences, scored, codec.encode, top_k=6, temperature=2.0, chunk_size=7)
    chunked = build_scored_cache(score, sequences, tmp_path / "chunked", scored=scored, codec=codec, **identity)
    assert {k: v for k, v in chunked.items() if k != "files"} == {k: v for k, v in full.items() if k != "files"}
    a, b = TokenCache(tmp_path / "full"), TokenCache(tmp_path / "chunked")
    batch = data.batch(torch.arange(len(data)))
    got, expected = a(batch), b(batch)
    assert torch.equal(got.token_ids, expected.token_ids)
    torch.testing.assert_close(got.logprobs, expected.logprobs, atol=1e-3, rtol=0)
    with pytest.raises(ValueError, match="no reachable output projection"):
        top_k_scorer(NoHead(len(tokenizer)), sequences, scored, codec.encode, top_k=6)
