"""A teacher of another tokenizer teaches token by token (distill.teachers.cross): identical tokenizers give the
same-tokenizer loss; a cache built by the teacher's tokenizer teaches a student of another as the live teacher
does; sampled (on-policy) batches are re-tokenized; padded vocabularies of one tokenizer are cut, and refused when
the cut rows hold real probability; `train-lm` runs each end to end."""

from __future__ import annotations

import json

import pytest
import torch

from distill.config import LossConfig
from distill.errors import DistillError
from distill.lm import lm_terms, student_samples
from distill.lm_data import Example, tokenize_examples
from distill.lm_models import gpt2, train_tokenizer, train_unigram_tokenizer
from distill.teachers import TeacherOutput
from distill.teachers.cross import CrossTokenizerTeacher, PaddedVocabTeacher
from distill.teachers.local import LocalTeacher
from distill.teachers.token_cache import TokenCache, build_token_cache, causal_lm_logits
from test_cli import distill_cli

TEXTS = [
    "the movie was really good and the acting was great",
    "a dull , boring film ; it was the worst of the year",
    "the dog runs in the park while the cat sleeps",
    "what a wonderful story about friendship and courage",
    "i did not like the ending but the music was lovely",
    "café crème and a naïve plot: 2 stars out of 5",
    "the actors play their parts with charm and wit",
    "an overlong , tedious mess with no heart at all",
] * 6
EXAMPLES = [Example("review :", " " + t) for t in TEXTS[:8]] + [Example("", t) for t in TEXTS[8:16]]
SIZE = {"layers": 1, "width": 32, "heads": 2}
LOSS = LossConfig(temperature=1.0, alpha=0.5, chunk_size=16)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """A byte-level BPE teacher and a SentencePiece-style unigram student, saved as model folders."""
    root = tmp_path_factory.mktemp("cross")
    teacher_tok = train_tokenizer(TEXTS, 300, root / "teacher")
    student_tok = train_unigram_tokenizer(TEXTS, 330, root / "student")
    teacher = gpt2(teacher_tok, {"layers": 2, "width": 32, "heads": 2}, 64, seed=3)
    student = gpt2(student_tok, SIZE, 64, seed=4).eval()
    teacher.save_pretrained(root / "teacher")
    student.save_pretrained(root / "student")
    return root, teacher.eval(), teacher_tok, student, student_tok


def cache_of(teacher, data, tokenizer, path, top_k):
    build_token_cache(causal_lm_logits(teacher), [s.numpy() for s in data.sequences], path,
                      scored=[data.scored(i).numpy() for i in range(len(data))], top_k=top_k, temperature=1.0,
                      teacher_name="t", teacher_revision="r", tokenizer_hash="h", vocab_size=len(tokenizer),
                      data_id=data.fingerprint(), batch_size=8)  # fmt: skip
    return TokenCache(path)


def kd(student, batch, teacher):
    terms, _ = lm_terms(student, batch, teacher, LOSS)
    return terms["kd"]


def test_identical_tokenizers_give_the_same_tokenizer_loss(pair, tmp_path):
    _, teacher, tokenizer, _, _ = pair
    student = gpt2(tokenizer, SIZE, 64, seed=5).eval()  # no dropout: two calls compare
    data = tokenize_examples(tokenizer, EXAMPLES, 48)
    batch = data.batch(torch.arange(6))
    vocab = len(tokenizer)
    live = LocalTeacher(teacher, vocab)
    dense = CrossTokenizerTeacher(live, tokenizer, tokenizer, teacher_data=data, max_length=48, top_k=vocab)
    torch.testing.assert_close(kd(student, batch, dense), kd(student, batch, live), atol=1e-5, rtol=1e-5)
    assert dense.coverage == 1.0
    cache = cache_of(teacher, data, tokenizer, tmp_path / "cache", top_k=8)
    aligned = CrossTokenizerTeacher(cache, tokenizer, tokenizer, teacher_data=data, max_length=48, top_k=8)
    torch.testing.assert_close(kd(student, batch, aligned), kd(student, batch, cache), atol=1e-6, rtol=1e-6)


def test_a_cache_of_the_teachers_tokenizer_teaches_another_student_as_the_live_teacher(pair, tmp_path):
    _, teacher, teacher_tok, student, student_tok = pair
    teacher_data = tokenize_examples(teacher_tok, EXAMPLES, 48)
    data = tokenize_examples(student_tok, EXAMPLES, 48)
    batch = data.batch(torch.arange(len(data)))
    cache = cache_of(teacher, teacher_data, teacher_tok, tmp_path / "cache", top_k=16)
    common = {"teacher_data": teacher_data, "max_length": 48, "top_k": 16}
    from_cache = CrossTokenizerTeacher(cache, teacher_tok, student_tok, **common)
    live = CrossTokenizerTeacher(LocalTeacher(teacher, len(teacher_tok)), teacher_tok, student_tok, **common)
    cached, direct = kd(student, batch, from_cache), kd(student, batch, live)
    assert float(direct.detach()) > 0
    torch.testing.assert_close(cached, direct, rtol=2e-3, atol=1e-4)  # the cache's 8-bit log-probs
    assert from_cache.coverage == live.coverage and 0.3 < live.coverage < 1.0  # word starts align; pieces do not
    output = live(batch)
    assert output.mask is not None and not bool((output.mask & ~batch["kd_mask"]).any())
    assert output.token_ids is not None and int(output.token_ids.max()) < len(student_tok)
    covered = output.token_ids[output.mask]  # (P, K): carried ids, -1 where the teacher's token has no twin
    assert bool((covered >= 0).any()) and bool((covered == -1).any())
    prefix = CrossTokenizerTeacher(cache, teacher_tok, student_tok, vocabulary="prefix", **common)(batch)
    assert prefix.token_ids is not None and torch.equal(prefix.mask, output.mask)
    exact = from_cache(batch)  # the mass the student's tokens get: the prefix map adds the words it lacks
    mass = [o.logprobs[o.mask].exp().masked_fill(o.token_ids[o.mask] < 0, 0).sum(-1) for o in (exact, prefix)]
    assert bool((mass[1] >= mass[0] - 1e-5).all()) and float(mass[1].mean()) > float(mass[0].mean())
    uld = CrossTokenizerTeacher(cache, teacher_tok, student_tok, uld=True, **common)(batch)
    assert uld.token_ids is None and uld.mask is not None
    values = uld.logprobs[uld.mask]  # (P, K): sorted, most likely first
    assert bool((values[:, :-1] >= values[:, 1:]).all())


def test_a_sampled_batch_is_re_tokenized_for_the_teacher(pair):
    _, teacher, teacher_tok, student, student_tok = pair
    teacher_data = tokenize_examples(teacher_tok, EXAMPLES, 48)
    data = tokenize_examples(student_tok, EXAMPLES, 48)
    batch = data.batch(torch.arange(4))
    sampled = student_samples(student, batch, max_new_tokens=12, temperature=1.0, seed=0,
                              pad_id=data.pad_id, eos_id=student_tok.eos_token_id)  # fmt: skip
    live = CrossTokenizerTeacher(LocalTeacher(teacher, len(teacher_tok)), teacher_tok, student_tok,
                                 teacher_data=teacher_data, max_length=48, top_k=8)  # fmt: skip
    output = live(sampled)
    assert output.mask is not None and bool(output.mask.any())
    assert not bool((output.mask & ~sampled["kd_mask"]).any())
    terms, weights = lm_terms(student, sampled, live, LOSS, on_policy=True)
    assert weights == {"kd": 1.0} and torch.isfinite(terms["kd"]) and float(terms["kd"].detach()) > 0


class Fixed:
    """A teacher giving the same dense log-probs (B, T, V) for every batch."""

    def __init__(self, logprobs):
        self.logprobs, self.num_classes = logprobs, logprobs.shape[-1]

    def __call__(self, batch):
        return TeacherOutput(logprobs=self.logprobs)


def test_padded_rows_are_dropped_with_their_mass_and_refused_when_it_is_not_negligible():
    kd_mask = torch.ones(2, 3, dtype=torch.bool)
    logits = torch.randn(2, 3, 12)
    logits[..., 10:] = -30.0  # padding rows: never predicted
    padded = PaddedVocabTeacher(Fixed(torch.log_softmax(logits, -1)), vocab_size=10)
    out = padded({"kd_mask": kd_mask})
    torch.testing.assert_close(out.logprobs, torch.log_softmax(logits[..., :10], -1))
    assert 0 < padded.dropped_mass < 1e-9
    smaller = PaddedVocabTeacher(Fixed(torch.log_softmax(logits[..., :10], -1)), vocab_size=12)({"kd_mask": kd_mask})
    assert smaller.logprobs.shape[-1] == 12 and float(smaller.logprobs[..., 10:].exp().sum()) < 1e-30
    logits[0, 1, 11] = 10.0  # a real token beyond the student's rows
    with pytest.raises(DistillError, match="beyond the student's 10"):
        PaddedVocabTeacher(Fixed(torch.log_softmax(logits, -1)), vocab_size=10)({"kd_mask": kd_mask})
    ids = torch.tensor([[[11, 3], [2, 1], [0, 4]]])  # a sparse teacher: its entries on dropped rows emptied
    sparse = PaddedVocabTeacher(Fixed(torch.zeros(1, 3, 2)), vocab_size=10)
    sparse.inner = lambda batch: TeacherOutput(logprobs=torch.log(torch.full((1, 3, 2), 1e-5)), token_ids=ids)
    out = sparse({"kd_mask": torch.ones(1, 3, dtype=torch.bool)})
    assert out.token_ids[0, 0].tolist() == [-1, 3] and sparse.dropped_mass == pytest.approx(1e-5)


def job(root, **extra):
    rows = [{"prompt": e.prompt, "completion": e.completion} for e in EXAMPLES]
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    lines = ["student: student", "data: train.jsonl", "eval_data: train.jsonl", "max_length: 48",
             "teacher_top_k: 16", "train:", "  epochs: 1", "  batch_size: 8", "  lr: 0.003",
             "loss:", "  chunk_size: 16", "  temperature: 1.0"]  # fmt: skip
    path = root / "job.yaml"
    path.write_text("\n".join(lines + [f"{k}: {v}" for k, v in extra.items()]) + "\n")
    return path


def test_train_lm_with_a_teacher_of_another_tokenizer_live_and_from_its_cache(pair):
    root = pair[0]
    live = distill_cli("train-lm", "--config", job(root, teacher="teacher"), "--output", root / "live",
                       cwd=root)  # fmt: skip
    assert live.returncode == 0, live.stderr
    metrics = json.loads(live.stdout)
    assert 0.3 < metrics["alignment"]["coverage"] < 1.0 and metrics["alignment"]["pairing"] == "aligned by bytes"
    rows = metrics["eval_models"]
    assert rows["student"]["bits_per_byte"] > 0 and rows["teacher"]["bits_per_byte"] > 0
    assert "kl_to_teacher" not in rows["student"]  # no common vocabulary to compare in
    assert "bits per byte" in (root / "live" / "student" / "README.md").read_text()
    built = distill_cli("cache", "build", "--teacher", root / "teacher", "--data", root / "train.jsonl", "--top-k",
                        "16", "--out", root / "cache", "--max-length", "48", cwd=root)  # fmt: skip
    assert built.returncode == 0, built.stderr
    cached = distill_cli("train-lm", "--config", job(root, cache="cache"), "--output", root / "cached",
                         cwd=root)  # fmt: skip
    assert cached.returncode == 0, cached.stderr
    taught = json.loads(cached.stdout)
    assert taught["alignment"]["coverage"] == pytest.approx(metrics["alignment"]["coverage"])
    first = [json.loads((root / run / "metrics.json").read_text())["history"][0]["kd"] for run in ("live", "cached")]
    assert first[1] == pytest.approx(first[0], rel=1e-2)  # the same divergence, to the cache's 8-bit rounding


def test_train_lm_with_a_padded_teacher_of_the_same_tokenizer(pair, tmp_path):
    root, _, teacher_tok, _, _ = pair
    from transformers import GPT2LMHeadModel

    teacher = GPT2LMHeadModel.from_pretrained(root / "teacher")
    teacher.resize_token_embeddings(len(teacher_tok) + 12)  # a table padded to a multiple, as large models are
    with torch.no_grad():  # padding rows a trained model never predicts: logits near -100 through one dimension
        teacher.transformer.ln_f.bias[0] += 10.0
        teacher.get_output_embeddings().weight[len(teacher_tok) :] = 0.0
        teacher.get_output_embeddings().weight[len(teacher_tok) :, 0] = -10.0
    teacher.save_pretrained(tmp_path / "teacher")
    teacher_tok.save_pretrained(tmp_path / "teacher")
    student = gpt2(teacher_tok, SIZE, 64, seed=6)  # the teacher's tokenizer, its table not padded
    student.save_pretrained(tmp_path / "student")
    teacher_tok.save_pretrained(tmp_path / "student")
    trained = distill_cli("train-lm", "--config", job(tmp_path, teacher="teacher"), "--output", tmp_path / "run",
                          cwd=tmp_path)  # fmt: skip
    assert trained.returncode == 0, trained.stderr
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert 0 < metrics["dropped_mass"] < 1e-6 and "Padded vocabularies" in (tmp_path / "run" / "report.md").read_text()


def test_on_policy_training_re_tokenizes_the_students_samples_and_a_cache_is_refused(pair, tmp_path):
    _, teacher, teacher_tok, _, student_tok = pair
    from distill.config import TrainConfig
    from distill.train import train

    prompted = EXAMPLES[:8] * 2  # the student samples completions of prompts
    teacher_data = tokenize_examples(teacher_tok, prompted, 48)
    data = tokenize_examples(student_tok, prompted, 48)
    common = {"teacher_data": teacher_data, "max_length": 48, "top_k": 8}
    live = CrossTokenizerTeacher(LocalTeacher(teacher, len(teacher_tok)), teacher_tok, student_tok, **common)
    loss = LossConfig(temperature=1.0, alpha=0.5, chunk_size=16, lmbda=1.0, max_new_tokens=8)
    result = train(gpt2(student_tok, SIZE, 64, seed=7), data, TrainConfig(epochs=1, batch_size=8), teacher=live,
                   loss=loss)  # fmt: skip
    assert result.steps == 2 and all(h["kd"] > 0 for h in result.history) and live.positions > 0
    cache = cache_of(teacher, teacher_data, teacher_tok, tmp_path / "cache", top_k=8)
    stored = CrossTokenizerTeacher(cache, teacher_tok, student_tok, **common)
    with pytest.raises(DistillError, match="needs a live teacher"):
        train(gpt2(student_tok, SIZE, 64, seed=7), data, TrainConfig(epochs=1, batch_size=8), teacher=stored,
              loss=loss)  # fmt: skip


def test_the_lm_recipe_with_a_student_of_another_tokenizer(tmp_path):
    import random

    words = ["the", "a", "cat", "dog", "movie", "film", "plays", "runs", "is", "was", "good", "bad", "very", "café"]
    rng = random.Random(0)
    lines = [" ".join(rng.choice(words) for _ in range(rng.randint(5, 12))) for _ in range(400)]
    (tmp_path / "corpus.txt").write_text("\n".join(lines) + "\n")
    settings = [
        "corpus=corpus.txt", "vocab_size=300", "student_vocab_size=300", "student_sample_size=100", "max_length=24",
        "top_k=8", "teacher.layers=1", "teacher.width=32", "teacher.heads=2", "student.layers=1",
        "student.width=16", "student.heads=2", "teacher_train.epochs=1", "student_train.epochs=1",
    ]  # fmt: skip
    args = ["run", "--recipe", "lm", "--student-tokenizer", "other", "--output", "out", "--json"]
    result = distill_cli(*args, *[a for s in settings for a in ("--set", s)], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    metrics = json.loads(result.stdout)
    assert set(metrics["models"]) == {
        "teacher",
        "student-alone",
        "student-seq-kd",
        "student-uld",
        "student-aligned",
        "student-aligned-prefix",
        "same-tokenizer-alone",
        "same-tokenizer-distilled",
    }
    for name, row in metrics["models"].items():
        assert row["bits_per_byte"] > 0 and row["step_seconds"] > 0, name
    assert metrics["models"]["student-aligned"]["tokenizer"].startswith("unigram")
    assert 0.2 < metrics["alignment"]["coverage"] < 1 and metrics["alignment"]["prefix_mapped"] > 0.9
    assert "(100 for the students)" in metrics["description"]
    report = (tmp_path / "out" / "report.md").read_text()
    assert "bits per byte" in report and "student-aligned" in report
    assert (tmp_path / "out" / "cache" / "tokenizer" / "tokenizer.json").is_file()
