import pytest
import torch

from conftest import tiny_gpt2
from distill.config import LossConfig, TrainConfig
from distill.errors import DataError, DistillError
from distill.lm import lm_terms, on_policy_step, student_samples
from distill.lm_data import Example, parse_row, read_examples, tokenize_examples
from distill.losses import hard_label_ce, hinton_terms
from distill.teachers.local import LocalTeacher
from distill.train import loss_terms, train

EXAMPLES = [
    Example("q : the dog runs", "a : the dog plays"),
    Example("q : a great movie", "a : best film of the year"),
    Example("", "the cat is happy and the dog is sad"),
    Example("q : bad food", "a : very bad"),
]


def test_parse_rows_and_errors(tmp_path):
    assert parse_row({"prompt": "p", "completion": "c"}, "x") == Example("p", "c")
    assert parse_row({"question": "q", "answer": "a"}, "x") == Example("q", "a")
    assert parse_row({"text": "t"}, "x") == Example("", "t")
    chat = parse_row({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}, "x")
    assert chat.completion == "yo" and "hi" in chat.prompt
    answered = parse_row({"messages": [{"role": "user", "content": "hi"}], "completion": "yo"}, "x")
    assert answered == chat  # `distill generate` writes the conversation and the answer apart
    for row, message in [
        ({"foo": 1}, "needs prompt/completion"),
        ({"prompt": "p", "completion": ""}, "not empty"),
        ({"messages": [{"role": "user", "content": "hi"}]}, "last message must be the assistant"),
        ({"messages": [{"role": "robot", "content": "hi"}]}, "needs a role"),
        ({"messages": "hi", "completion": "yo"}, "messages must be a list"),
        ([1, 2], "expected a JSON object"),
    ]:
        with pytest.raises(DataError, match=message):
            parse_row(row, "line 3 of f.jsonl")
    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": "a", "completion": "b"}\n{not json}\n')
    with pytest.raises(DataError, match="line 2 of .* is not valid JSON"):
        read_examples(path)


def test_labels_cover_only_completion_tokens():
    _, tokenizer = tiny_gpt2()
    data = tokenize_examples(tokenizer, EXAMPLES)
    batch = data.batch(torch.tensor([0, 2]))
    ids, labels = batch["inputs"]["input_ids"], batch["labels"]
    prompt = len(tokenizer("q : the dog runs")["input_ids"])
    completion = tokenizer("a : the dog plays")["input_ids"] + [tokenizer.eos_token_id]
    assert labels[0, prompt - 1 : prompt - 1 + len(completion)].tolist() == completion
    assert (labels[0, : prompt - 1] == -100).all() and (labels[0, prompt - 1 + len(completion) :] == -100).all()
    n = int(batch["inputs"]["attention_mask"][1].sum())
    assert (labels[1, : n - 1] == ids[1, 1:n]).all()  # no prompt: every next token is scored
    assert torch.equal(batch["kd_mask"], labels != -100)


def test_chunked_lm_terms_equal_the_full_logits_path():
    student, tokenizer = tiny_gpt2(seed=1)
    student.eval()  # no dropout: the two paths see the same network
    teacher_model, _ = tiny_gpt2(layers=3, seed=2)
    data = tokenize_examples(tokenizer, EXAMPLES)
    batch = data.batch(torch.arange(4))
    loss = LossConfig(temperature=2.0, alpha=0.6, chunk_size=5)
    teacher = LocalTeacher(teacher_model, len(tokenizer))
    terms, weights = lm_terms(student, batch, teacher, loss)
    (sum(weights[k] * terms[k] for k in terms)).backward()
    chunked_grads = [p.grad.clone() for p in student.parameters()]
    student.zero_grad()
    logits = student(**batch["inputs"]).logits
    mask = batch["kd_mask"].reshape(-1)
    full = hinton_terms(
        logits.reshape(-1, logits.shape[-1])[mask],
        teacher(batch).logprobs.reshape(-1, logits.shape[-1])[mask],
        batch["labels"].reshape(-1)[mask],
        temperature=2.0,
    )
    (0.6 * full["kd"] + 0.4 * full["ce"]).backward()
    assert torch.allclose(terms["kd"], full["kd"], atol=1e-5) and torch.allclose(terms["ce"], full["ce"], atol=1e-5)
    for a, p in zip(chunked_grads, student.parameters()):
        assert torch.allclose(a, p.grad, atol=1e-5)
    alone, _ = lm_terms(student, batch, None, loss)
    assert torch.allclose(
        alone["ce"], hard_label_ce(logits.reshape(-1, logits.shape[-1]), batch["labels"].reshape(-1)), atol=1e-5
    )
    # the generic loop path (chunk_size 0) gives the same terms
    generic, _ = loss_terms(student, batch, teacher, loss.model_copy(update={"chunk_size": 0}))
    assert torch.allclose(generic["kd"], terms["kd"], atol=1e-5)


def test_a_hard_label_term_of_weight_zero_is_not_computed():
    student, tokenizer = tiny_gpt2(seed=1)
    student.eval()
    teacher = LocalTeacher(tiny_gpt2(layers=3, seed=2)[0], len(tokenizer))
    batch = tokenize_examples(tokenizer, EXAMPLES).batch(torch.arange(4))
    mixed, _ = lm_terms(student, batch, teacher, LossConfig(divergence="jsd", alpha=0.5, chunk_size=5))
    kd_alone, weights = lm_terms(student, batch, teacher, LossConfig(divergence="jsd", alpha=1.0, chunk_size=5))
    assert set(kd_alone) == {"kd"} and weights == {"kd": 1.0}
    assert torch.allclose(kd_alone["kd"], mixed["kd"], atol=1e-6)
    kd_alone["kd"].backward()
    mixed_grads = [p.grad.clone() for p in student.parameters()]
    student.zero_grad()
    mixed["kd"].backward()  # the same divergence's gradients, computed beside the cross-entropy's
    for a, p in zip(mixed_grads, student.parameters()):
        assert torch.allclose(a, p.grad, atol=1e-6)


def test_token_cache_teacher_gives_the_live_teachers_loss_at_the_same_k(tmp_path):
    from distill.teachers.token_cache import TokenCache, build_token_cache, causal_lm_logits

    student, tokenizer = tiny_gpt2(seed=1)
    student.eval()
    teacher_model, _ = tiny_gpt2(layers=3, seed=2)
    teacher_model.eval()
    data = tokenize_examples(tokenizer, EXAMPLES)
    k = 8
    build_token_cache(
        causal_lm_logits(teacher_model),
        [s.numpy() for s in data.sequences],
        tmp_path / "cache",
        scored=[data.scored(i).numpy() for i in range(len(data))],
        top_k=k,
        teacher_name="t",
        teacher_revision="r",
        tokenizer_hash="h",
        vocab_size=len(tokenizer),
        data_id=data.fingerprint(),
    )
    cache = TokenCache(tmp_path / "cache")
    loss = LossConfig(temperature=1.0, alpha=1.0, chunk_size=4)
    batch = data.batch(torch.tensor([3, 1, 0]))
    from_cache, _ = lm_terms(student, batch, cache, loss)

    class ExactTopK:
        num_classes = len(tokenizer)

        def __call__(self, b):
            logprobs = torch.log_softmax(teacher_model(**b["inputs"]).logits.float(), -1)
            values, ids = logprobs.topk(k, dim=-1)
            from distill.teachers import TeacherOutput

            return TeacherOutput(logprobs=values, token_ids=ids)

    with torch.no_grad():
        exact, _ = lm_terms(student, batch, ExactTopK(), loss)
    assert float(from_cache["kd"].detach()) == pytest.approx(float(exact["kd"]), abs=2e-3)


def test_training_an_lm_student_alone_and_distilled_lowers_the_loss():
    student, tokenizer = tiny_gpt2(seed=1)
    teacher_model, _ = tiny_gpt2(layers=3, seed=2)
    data = tokenize_examples(tokenizer, EXAMPLES * 4)
    config = TrainConfig(epochs=6, batch_size=4, lr=1e-2, schedule="constant", warmup=0.0)
    train(teacher_model, data, config)  # a teacher that knows the data
    result = train(
        student,
        data,
        config,
        teacher=LocalTeacher(teacher_model, len(tokenizer)),
        loss=LossConfig(temperature=1.0, alpha=1.0, chunk_size=8),
    )
    assert result.history[-1]["kd"] < result.history[0]["kd"]
    alone, _ = tiny_gpt2(seed=1)
    result = train(alone, data, config)
    assert result.history[-1]["ce"] < 0.7 * result.history[0]["ce"]


def test_on_policy_batches_sample_from_the_student(tmp_path):
    student, tokenizer = tiny_gpt2(seed=1)
    teacher_model, _ = tiny_gpt2(layers=3, seed=2)
    data = tokenize_examples(tokenizer, [e for e in EXAMPLES if e.prompt])
    batch = data.batch(torch.arange(3))
    sampled = student_samples(student, batch, max_new_tokens=5, temperature=1.0, seed=3, pad_id=0, eos_id=2)
    again = student_samples(student, batch, max_new_tokens=5, temperature=1.0, seed=3, pad_id=0, eos_id=2)
    assert torch.equal(sampled["inputs"]["input_ids"], again["inputs"]["input_ids"])
    for b in range(3):
        p = int(batch["prompt_lengths"][b])
        assert torch.equal(sampled["inputs"]["input_ids"][b, :p], batch["inputs"]["input_ids"][b, :p])
        assert 1 <= int(sampled["kd_mask"][b].sum()) <= 5
    assert [on_policy_step(0, s, 0.5) for s in range(20)].count(True) not in (0, 20)
    result = train(
        student,
        data,
        TrainConfig(epochs=2, batch_size=3, lr=1e-3),
        teacher=LocalTeacher(teacher_model, len(tokenizer)),
        loss=LossConfig(lmbda=1.0, divergence="jsd", beta=0.5, max_new_tokens=4, chunk_size=4),
    )
    assert set(result.history[0]) >= {"kd", "loss"} and "ce" not in result.history[0]


def test_on_policy_needs_a_live_teacher(tmp_path):
    student, tokenizer = tiny_gpt2(seed=1)
    data = tokenize_examples(tokenizer, EXAMPLES)
    with pytest.raises(DistillError, match="needs a live teacher"):
        train(student, data, TrainConfig(epochs=1), teacher=None, loss=LossConfig(lmbda=0.5))
