"""Sparse token-level distillation from a teacher API's top log-probs: `distill serve` on a tiny GPT-2, `generate`
keeps the log-probs, `cache_from_generated` turns them into a token cache, `train-lm` trains on it."""

from __future__ import annotations

import json

import pytest
import torch

from distill.config import LossConfig, TrainConfig
from distill.errors import DataError, DistillError
from distill.generate import PromptRecord, generate
from distill.generate.answers import RequestParams
from distill.generate.client import TeacherClient
from distill.lm import lm_terms
from distill.lm_data import read_examples, tokenize_examples
from distill.losses import LOSSES
from distill.serve import serve_in_thread
from distill.teachers.api_logprobs import VocabularyText, cache_from_generated, token_pieces
from distill.teachers.token_cache import TokenCache, verify_token_cache
from distill.train import loss_terms
from distill.train_lm import LMJobConfig
from test_cli import distill_cli
from test_serve import tiny_chat_lm

PROMPTS = ["the movie was", "q : the dog runs", "a great story and", "the cat is", "bad food :", "the man plays"]
TEXTS = [
    "the movie was great and the actors were very good",
    "a story about a dog that runs in the park every day",
    "the food was bad but the service was friendly",
    "she plays the guitar and he sings a happy song",
] * 30


def bpe_gpt2(directory):
    """A tiny random GPT-2 over a byte-level BPE tokenizer trained here (the GPT-2 kind of tokenizer)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from distill.lm_models import train_tokenizer

    tokenizer = train_tokenizer(TEXTS, 300, directory)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=64, n_embd=32, n_layer=2, n_head=2,
                        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)  # fmt: skip
    torch.manual_seed(3)
    model = GPT2LMHeadModel(config)
    model.save_pretrained(directory)
    return model, tokenizer


def generated(tmp_path, model_dir, top_logprobs=5, temperature=0.5):
    """Sample 2 answers to each prompt from `distill serve` through /completions, log-probs kept."""
    out = tmp_path / "generated.jsonl"
    with serve_in_thread(model_dir, model_name="tiny") as base_url:
        summary = generate(
            [PromptRecord(prompt=p) for p in PROMPTS],
            TeacherClient(base_url, "tiny"),
            out,
            n=2,
            params=RequestParams(temperature=temperature, max_tokens=10, seed=1, top_logprobs=top_logprobs),
            endpoint="completions",
        )
    assert summary.written == 2 * len(PROMPTS) and not summary.failed
    # A random teacher sometimes ends its answer at once; train-lm refuses empty completions, so drop those rows.
    rows = [line for line in out.read_text().splitlines() if json.loads(line)["completion"]]
    out.write_text("\n".join(rows) + "\n")
    return out


@pytest.fixture(scope="module", params=["word-level", "byte-level BPE"])
def served(request, tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("api-logprobs")
    if request.param == "word-level":
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tiny_chat_lm(tmp_path / "teacher")
        model = AutoModelForCausalLM.from_pretrained(tmp_path / "teacher")
        tokenizer = AutoTokenizer.from_pretrained(tmp_path / "teacher")
    else:
        model, tokenizer = bpe_gpt2(tmp_path / "teacher")
    model.eval()
    return tmp_path, model, tokenizer, generated(tmp_path, tmp_path / "teacher")


def test_the_cache_holds_the_teachers_own_log_probs_at_the_aligned_positions(served):
    tmp_path, model, tokenizer, path = served
    directory = tmp_path / "cache"
    summary = cache_from_generated(path, tokenizer, directory)
    verify_token_cache(directory)
    assert summary.rows == summary.rows_with_logprobs >= 6
    assert summary.top_k == 6 and summary.positions > 0
    # /completions returns each position's top 5 as a {text: log-prob} object, so texts that several ids share
    # (byte fragments, all "\ufffd") come once.
    assert 0 < summary.alternatives <= 5 * summary.positions
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    if len(tokenizer) < 100:
        # Word-level: one way to split a text, so every row lines up (its only special token, <eos>, ends the
        # text), and every alternative maps to an id (none is a text that several ids share).
        assert summary.rows_aligned == len(rows) and summary.alternatives == 5 * summary.positions
        assert summary.alternatives_mapped == summary.alternatives
        assert summary.coverage > 0.85  # all but the <eos> positions, for which APIs return no log-probs
    else:
        # Byte-level BPE: a random teacher often samples a split of a text other than the tokenizer's own, where
        # the rest of its row is left out, and puts the byte tokens that all decode to "\ufffd" in its top 5.
        assert summary.alternatives_mapped >= 0.5 * summary.alternatives
        assert summary.coverage > 0.1
    data = tokenize_examples(tokenizer, read_examples(path, tokenizer))
    cache = TokenCache(directory, expect={"data_id": data.fingerprint(), "temperature": 1.0})
    vocabulary = VocabularyText(tokenizer)
    checked = 0
    for i, (sequence, row) in enumerate(zip(data.sequences, rows)):
        out = cache.batch([i], len(sequence))
        with torch.no_grad():
            live = torch.log_softmax(model(sequence[None]).logits.float(), -1)[0]  # (T, V)
        for t in out.mask[0].nonzero()[:, 0].tolist():
            j = t + 1 - int(data.prompt_lengths[i])  # the completion token whose distribution position t holds
            alternatives = {vocabulary.id_of(text, first=j == 0) for text, _ in row["top_logprobs"]["top"][j]}
            returned = {int(sequence[t + 1])} | (alternatives - {None})  # the sampled token is always kept
            ids, values = out.token_ids[0, t].tolist(), out.logprobs[0, t]
            kept = torch.tensor([token in returned for token in ids])
            assert int(kept.sum()) == len(returned)
            assert torch.allclose(values[kept], live[t, out.token_ids[0, t][kept]], atol=0.05)
            assert bool((values[~kept] < values[0] - 15).all())  # the padding: other ids at (nearly) no mass
            checked += 1
    assert checked == summary.positions


def test_train_lm_learns_from_the_api_cache_and_weighs_uncovered_positions_zero(served):
    tmp_path, _, tokenizer, path = served
    directory = tmp_path / "cache-train"
    cache_from_generated(path, tokenizer, directory)
    from transformers import AutoModelForCausalLM, GPT2LMHeadModel

    student_dir = tmp_path / "student"  # one layer, other weights, the teacher's tokenizer
    config = AutoModelForCausalLM.from_pretrained(tmp_path / "teacher").config
    config.n_layer = 1
    torch.manual_seed(7)
    student = GPT2LMHeadModel(config)
    student.save_pretrained(student_dir)
    tokenizer.save_pretrained(student_dir)
    student.eval()
    data = tokenize_examples(tokenizer, read_examples(path, tokenizer))
    cache = TokenCache(directory)
    batch = data.batch(torch.arange(len(data)))
    loss = LossConfig(temperature=1.0, alpha=1.0, chunk_size=8)
    terms, _ = lm_terms(student, batch, cache, loss)
    # The divergence over the covered positions only, from the full logits.
    out = cache(batch)
    covered = batch["kd_mask"] & out.mask  # (B, T)
    assert bool((out.mask & ~batch["kd_mask"]).sum() == 0)  # the cache covers completion positions only
    with torch.no_grad():
        logits = student(**batch["inputs"]).logits.float()
    expected = LOSSES["forward_kl"](logits[covered], out.logprobs[covered], token_ids=out.token_ids[covered])
    assert float(terms["kd"]) == pytest.approx(float(expected), rel=1e-4, abs=1e-5)
    full, _ = loss_terms(student, batch, cache, loss.model_copy(update={"chunk_size": 0}))  # the full-logits path
    assert float(full["kd"]) == pytest.approx(float(expected), rel=1e-4, abs=1e-5)

    from distill.stages import RunContext
    from distill.train_lm import run_train_lm

    job = LMJobConfig(student=str(student_dir), cache=directory, data=path, max_length=64,
                      loss=LossConfig(temperature=1.0, alpha=1.0, chunk_size=16),
                      train=TrainConfig(epochs=3, batch_size=4, lr=3e-3))  # fmt: skip
    metrics = run_train_lm(job, RunContext(tmp_path / "run", store=tmp_path))
    kd = [epoch["kd"] for epoch in metrics["history"]]
    assert all(torch.isfinite(torch.tensor(kd))) and kd[-1] < 0.8 * kd[0]


def test_token_pieces_and_vocabulary_text_agree_with_the_server(served):
    _, _, tokenizer, path = served
    vocabulary = VocabularyText(tokenizer)
    row = json.loads(path.read_text().splitlines()[0])
    ids = tokenizer(row["completion"], add_special_tokens=False)["input_ids"]
    pieces = token_pieces(tokenizer, ids)
    assert "".join(pieces) == tokenizer.decode(ids)
    for j, (piece, token) in enumerate(zip(pieces, ids)):
        assert vocabulary.id_of(piece, first=j == 0) in (token, None)  # None only for a text several ids share


def test_rows_without_top_log_probs_or_from_another_tokenizer_are_refused(served, tmp_path):
    _, _, tokenizer, path = served
    bare = tmp_path / "bare.jsonl"
    bare.write_text("\n".join(json.dumps({k: v for k, v in json.loads(line).items() if k != "top_logprobs"})
                              for line in path.read_text().splitlines()) + "\n")  # fmt: skip
    with pytest.raises(DataError, match="--top-logprobs"):
        cache_from_generated(bare, tokenizer, tmp_path / "c1")
    broken = tmp_path / "broken.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    rows[0]["top_logprobs"] = {"tokens": ["a"]}
    broken.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    with pytest.raises(DataError, match="line 1 of .*broken.jsonl"):
        cache_from_generated(broken, tokenizer, tmp_path / "c2")
    # Another tokenizer: one that knows none of the teacher's words (each becomes <unk>, which decodes to nothing).
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.WordLevel({"<eos>": 0, "<unk>": 1, "XYZ": 2}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    other = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<eos>", unk_token="<unk>")
    with pytest.raises(DistillError, match="another tokenizer"):
        cache_from_generated(path, other, tmp_path / "c3")


def test_the_cli_builds_the_cache_and_says_what_it_covers(served, tmp_path):
    root, _, _, path = served
    result = distill_cli("cache", "from-generated", str(path), "--student", str(root / "teacher"),
                         "--out", str(tmp_path / "cache"))  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "teacher distributions over" in result.stdout and "k = 6" in result.stdout
    assert (tmp_path / "cache" / "manifest.json").is_file()
