"""A teacher's token cache built through its server (teacher-forced scoring): equal to the local `cache build` of the
same model within the codec's quantisation, resumable without asking again, refused for a server that cannot score
or has another vocabulary; the CLI and the service's cache-build job with `api`."""

from __future__ import annotations

import json
import random
import time

import httpx
import numpy as np
import pytest
import torch

from _fake_scoring import scoring_app, serve_app
from conftest import TINY_WORDS, tiny_gpt2, tiny_tokenizer
from distill.errors import CacheError, DistillError
from distill.generate.client import TeacherClient, TeacherClientError
from distill.hf import build_lm_cache
from distill.lm_data import read_examples, tokenize_examples
from distill.progress import Cancelled, RecordingReporter
from distill.teachers.api_logprobs import token_pieces
from distill.teachers.cache_compare import cache_kl
from distill.teachers.served_cache import build_served_cache
from distill.teachers.served_scores import pieces
from distill.teachers.token_cache import TokenCache, verify_token_cache
from test_cli import assert_one_line_error, distill_cli

K = 8
WORDS = [w for w in TINY_WORDS if w not in ("q", "a", ":")]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """A tiny GPT-2 with sharper than random distributions (saved), its tokenizer, a data file and the local cache."""
    directory = tmp_path_factory.mktemp("served") / "teacher"
    model, tokenizer = tiny_gpt2(directory)
    with torch.no_grad():
        model.lm_head.weight.mul_(6.0)
    model.save_pretrained(directory)
    rng = random.Random(0)
    rows = [{"prompt": " ".join(rng.choices(WORDS, k=rng.randint(1, 6))),
             "completion": " ".join(rng.choices(WORDS, k=rng.randint(1, 12)))} for _ in range(24)]  # fmt: skip
    data = directory.parent / "data.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    local = directory.parent / "local"
    build_lm_cache(directory, data, local, top_k=K, max_length=32, batch_size=4)
    return model.eval(), tokenizer, data, local


def client_of(app, **options) -> TeacherClient:
    return TeacherClient("http://fake/v1", "tiny", transport=httpx.ASGITransport(app=app), seed=0, **options)


def build(app, teacher, directory, **options):
    _, tokenizer, data, _ = teacher
    settings = {"top_k": K, "max_length": 32, **options}
    client = client_of(app, max_retries=0, concurrency=4)
    return build_served_cache(client, data, tokenizer, directory, **settings)


def assert_same_cache(served_dir, local_dir, special=()):
    """Position by position: the same ids (as sets) and log-probs within the codec's grid, and KL < 1e-4; where the
    local top-k holds one of the `special` ids (which echo cannot name unless it is the sent token), the served one
    keeps the others and puts the special ones' mass in its tail. Returns the KL at each position and whether it held a special id."""
    served, local = TokenCache(served_dir), TokenCache(local_dir)
    for key in ("tokenizer_hash", "data_id", "sequences", "positions", "top_k", "temperature", "vocab_size"):
        assert served.manifest[key] == local.manifest[key], key
    lossy = []
    for i in range(len(local)):
        width = int(local.lengths[i])
        ours, theirs = served.batch([i], width), local.batch([i], width)
        assert torch.equal(ours.mask, theirs.mask)
        for t in torch.nonzero(theirs.mask[0]).flatten().tolist():
            a = dict(zip(theirs.token_ids[0, t].tolist(), theirs.logprobs[0, t].tolist()))
            b = dict(zip(ours.token_ids[0, t].tolist(), ours.logprobs[0, t].tolist()))
            lossy.append(bool((set(a) - set(b)) & set(special)))  # a special id the served cache lacks
            if lossy[-1]:
                assert set(b) >= set(a) - set(special), (i, t)
                assert sum(np.exp(list(b.values()))) < sum(np.exp(list(a.values()))), (i, t)  # a larger tail
                continue
            assert set(a) == set(b), (i, t)
            assert max(abs(a[x] - b[x]) for x in a) <= local.codec.step_max, (i, t)
    kl, lossy = cache_kl(local, served), np.array(lossy)
    assert len(kl) == len(lossy) and lossy.mean() < 0.5
    assert kl[~lossy].max() < 1e-4, kl[~lossy].max()
    return kl, lossy


@pytest.mark.parametrize(
    "formats, alone, alone_scored, scoring, refused",
    [
        (("prompt_logprobs", "echo"), False, True, "prompt_logprobs", 0),
        (("prompt_logprobs",), True, True, "prompt_logprobs", 0),
        (("prompt_logprobs",), False, False, "prompt_logprobs+1", 1),  # vLLM: max_tokens 0 refused, 1 then
        (("echo",), False, True, "echo", 2),  # prompt_logprobs refused (with 0 tokens, then 1) first
    ],
    ids=["prompt_logprobs", "prompt_logprobs-decoded-alone", "prompt_logprobs-one-token", "echo"],
)
def test_the_served_cache_equals_the_local_build(teacher, tmp_path, formats, alone, alone_scored, scoring, refused):
    model, tokenizer, _, local = teacher
    app = scoring_app(model, tokenizer, formats=formats, decoded_alone=alone, scores_alone=alone_scored)
    summary = build(app, teacher, tmp_path / "served")
    assert summary.scoring == scoring and summary.top_k == K and summary.rows_asked == 24
    assert len(app.state.prompts) == 24 + refused  # one a row, after the requests of the formats refused
    assert summary.requests == 24 and summary.prompt_tokens == sum(len(p) for p in app.state.prompts[-24:])
    special = tokenizer.all_special_ids if formats == ("echo",) else ()  # they decode to "": echo cannot name them
    kl, lossy = assert_same_cache(tmp_path / "served", local, special)
    assert lossy.any() == (formats == ("echo",))  # the random teacher often ranks <pad>, <unk>, <eos> high
    manifest = verify_token_cache(tmp_path / "served")
    served = TokenCache(tmp_path / "served").manifest["served"]
    assert served["scoring"] == scoring and served["top_k_requested"] == K and served["top_k"] == K
    assert served["model"] == "tiny" and served["base_url"] == "http://fake/v1" and manifest["top_k"] == K
    assert served["usage"]["requests"] == 24 and served["tokens_checked"] == summary.tokens_checked > 0


@pytest.mark.parametrize("scoring", ["prompt_logprobs", "echo"])
def test_through_distill_serve_the_cache_equals_the_local_build(teacher, tmp_path, scoring):
    """The real server (`distill serve` of the teacher's folder) in each format."""
    from distill.serve import serve_in_thread

    _, tokenizer, data, local = teacher
    with serve_in_thread(local.parent / "teacher", model_name="tiny") as url:
        client = TeacherClient(url, "tiny", max_retries=0, concurrency=8)
        summary = build_served_cache(client, data, tokenizer, tmp_path / "served", top_k=K, max_length=32,
                                     scoring=(scoring,))  # fmt: skip
    assert summary.scoring == scoring and summary.top_k == K and summary.rows_asked == summary.requests == 24
    assert summary.tokens_checked == sum(int(n) - 1 for n in TokenCache(local).lengths)
    kl, lossy = assert_same_cache(tmp_path / "served", local, tokenizer.all_special_ids if scoring == "echo" else ())
    assert lossy.any() == (scoring == "echo")


def test_a_killed_build_asks_only_for_the_rows_it_lacks(teacher, tmp_path):
    model, tokenizer, _, local = teacher
    failing = scoring_app(model, tokenizer, fail_after=10, fail_status=400)
    with pytest.raises(TeacherClientError, match="injected failure"):
        build(failing, teacher, tmp_path / "served", shard_tokens=16)
    partial = json.loads((tmp_path / "served" / "partial.json").read_text())
    done = sum(s["sequences"] for s in partial["shards"])
    assert 0 < done < 10
    healthy = scoring_app(model, tokenizer)
    summary = build(healthy, teacher, tmp_path / "served", shard_tokens=16)
    rows = tokenize_examples(tokenizer, read_examples(teacher[2], tokenizer), 32).sequences
    asked = sorted(map(tuple, healthy.state.prompts))  # each row once, no probe (the rows go shortest first)
    assert asked == sorted(tuple(s.tolist()) for s in rows[done:])
    assert summary.rows_asked == 24 - done and summary.requests == 24 - done
    assert_same_cache(tmp_path / "served", local)
    again = scoring_app(model, tokenizer)
    reused = build(again, teacher, tmp_path / "served", shard_tokens=16)
    assert again.state.prompts == [] and reused.requests == 0 and reused.positions == summary.positions


class Progress(RecordingReporter):
    """Records the stages and the progress; says `cancelled` once `cancel_after` positions are done."""

    def __init__(self, cancel_after: int | None = None):
        super().__init__()
        self.done, self.cancel_after = 0, cancel_after

    def advance(self, steps: int = 1, **metrics: float) -> None:
        self.done += steps

    def cancelled(self) -> bool:
        return self.cancel_after is not None and self.done >= self.cancel_after


def test_requests_are_concurrent_the_rows_in_order_and_progress_reported(teacher, tmp_path):
    model, tokenizer, data, local = teacher
    app = scoring_app(model, tokenizer, delay=0.05)
    client = TeacherClient("http://fake/v1", "tiny", transport=httpx.ASGITransport(app=app), concurrency=6)
    started, progress = time.perf_counter(), Progress()
    summary = build_served_cache(client, data, tokenizer, tmp_path / "served", top_k=K, max_length=32,
                                 shard_tokens=16, reporter=progress)  # fmt: skip
    assert app.state.max_in_flight == 6 and time.perf_counter() - started < 24 * 0.05 / 2
    assert progress.stages == ["teacher top-k cache"] and progress.done == summary.positions
    assert_same_cache(tmp_path / "served", local)


def test_a_cancelled_build_stops_and_resumes(teacher, tmp_path):
    model, tokenizer, _, local = teacher
    app = scoring_app(model, tokenizer)
    with pytest.raises(Cancelled):
        build(app, teacher, tmp_path / "served", shard_tokens=16, reporter=Progress(cancel_after=60))
    asked = len(app.state.prompts)
    assert asked < 24 and (tmp_path / "served" / "partial.json").exists()
    resumed = build(scoring_app(model, tokenizer), teacher, tmp_path / "served", shard_tokens=16)
    assert resumed.rows_asked < 24
    assert_same_cache(tmp_path / "served", local)


def test_a_server_that_cannot_score_is_refused(teacher, tmp_path):
    model, tokenizer, _, _ = teacher
    for unsupported in ("refuse", "ignore"):
        app = scoring_app(model, tokenizer, formats=(), unsupported=unsupported)
        with pytest.raises(
            DistillError, match=r"the server at http://fake/v1 cannot score prompts \(prompt_logprobs: "
        ) as caught:
            build(app, teacher, tmp_path / unsupported)
        assert "echo: " in str(caught.value) and len(app.state.prompts) == 3  # one probe per format
        assert not (tmp_path / unsupported / "partial.json").exists()
    with pytest.raises(DistillError, match="at most 20 log-probs.*many servers give at most 20 log-probs: ask for"):
        build(scoring_app(model, tokenizer), teacher, tmp_path / "many", top_k=21)  # more than it gives: refused
    down = TeacherClient("http://127.0.0.1:9/v1", "tiny", max_retries=0, connect_timeout=2)
    with pytest.raises(TeacherClientError, match="connection error"):  # unreachable: not a question of formats
        build_served_cache(down, teacher[2], tokenizer, tmp_path / "down", top_k=K)


def test_the_cache_keeps_what_the_server_returns(teacher, tmp_path):
    model, tokenizer, _, _ = teacher
    app = scoring_app(model, tokenizer, cap=5, truncate=True)
    summary = build(app, teacher, tmp_path / "served", top_k=12)
    assert summary.top_k == 5 and summary.top_k_requested == 12
    cache = TokenCache(tmp_path / "served")
    assert cache.top_k == 5 and cache.manifest["served"]["top_k"] == 5
    assert cache.manifest["top_k_requested"] == 12
    with pytest.raises(CacheError, match="top_k_requested"):  # the same directory, other settings
        build(app, teacher, tmp_path / "served", top_k=6)


@pytest.mark.parametrize("formats", [("prompt_logprobs",), ("echo",)])
def test_a_server_with_another_vocabulary_is_refused(teacher, tmp_path, formats):
    model, tokenizer, _, _ = teacher
    other = tiny_tokenizer()
    vocab = dict(sorted(other.get_vocab().items(), key=lambda item: item[1]))
    words = list(vocab)[3:]
    random.Random(1).shuffle(words)
    shuffled = tiny_tokenizer()
    shuffled.backend_tokenizer.model = type(other.backend_tokenizer.model)(
        {w: i for i, w in enumerate([*list(vocab)[:3], *words])}, unk_token="<unk>"
    )
    app = scoring_app(model, tokenizer, formats=formats, texts=shuffled)
    with pytest.raises(DistillError, match="does not tokenize like the student's tokenizer: row 0, token"):
        build(app, teacher, tmp_path / "served")
    assert len(app.state.prompts) == 1 + 2 * (
        formats == ("echo",)
    )  # the probe: prompt_logprobs refused twice, then echo


def test_pieces_are_the_texts_tokens_add(teacher, tmp_path):
    """The batched pieces through the Rust tokenizer equal api_logprobs.token_pieces, for a word-level tokenizer and
    a byte-level BPE whose tokens split UTF-8 characters."""
    from distill.lm_models import train_tokenizer

    _, tokenizer, _, _ = teacher
    ids = tokenizer("the movie was great and i love it", add_special_tokens=False)["input_ids"] + [2]
    assert pieces(tokenizer, ids) == token_pieces(tokenizer, ids)
    texts = ["déjà vu, naïve café", "日本語のテキスト", "plain words and more words"] * 20
    bpe = train_tokenizer(texts, 300, tmp_path)
    ids = bpe("a naïve café: 日本 déjà", add_special_tokens=False)["input_ids"] + [bpe.eos_token_id]
    assert pieces(bpe, ids) == token_pieces(bpe, ids) and "\ufffd" in "".join(pieces(bpe, ids))


def test_cache_kl_is_zero_for_the_same_cache_and_sees_a_difference(teacher, tmp_path):
    model, tokenizer, data, local = teacher
    assert np.abs(cache_kl(TokenCache(local), TokenCache(local))).max() < 1e-9
    with torch.no_grad():
        other = type(model)(model.config)
    other.save_pretrained(tmp_path / "other")
    tokenizer.save_pretrained(tmp_path / "other")
    build_lm_cache(tmp_path / "other", data, tmp_path / "cache", top_k=K, max_length=32)
    assert cache_kl(TokenCache(local), TokenCache(tmp_path / "cache")).mean() > 0.1
    build_lm_cache(tmp_path / "other", data, tmp_path / "short", top_k=K, max_length=16)
    with pytest.raises(ValueError, match="not of the same sequences"):
        cache_kl(TokenCache(local), TokenCache(tmp_path / "short"))


def test_cli_builds_through_a_server(teacher, tmp_path):
    model, tokenizer, data, local = teacher
    app = scoring_app(model, tokenizer)
    student = local.parent / "teacher"  # the student shares the teacher's tokenizer
    with serve_app(app) as url:
        args = ["cache", "build", "--base-url", url, "--model", "tiny", "--student", student, "--data", data,
                "--out", tmp_path / "served", "--top-k", K, "--max-length", 32, "--price-input", 2.0]  # fmt: skip
        result = distill_cli(*args, "--api-key-env", "TEACHER_KEY", cwd=tmp_path, env={"TEACHER_KEY": "sk-test"})
        assert result.returncode == 0, result.stderr
        assert app.state.keys == {"Bearer sk-test"}
        tokens = sum(len(p) for p in app.state.prompts)
        assert f"k = {K} of the {K} asked" in result.stdout and "24 rows scored with prompt_logprobs" in result.stdout
        assert f"{tokens:,} prompt" in result.stdout and f"cost {2.0 * tokens / 1e6:.4f}" in result.stdout
        again = distill_cli(*args, cwd=tmp_path)
        assert again.returncode == 0 and "nothing asked" in again.stdout
    assert_same_cache(tmp_path / "served", local)
    for extra, fragment in [
        (["--teacher", student], "not both"),
        (["--temperature", "2"], "--temperature applies to a local --teacher only"),
    ]:
        assert_one_line_error(distill_cli(*args, *extra, cwd=tmp_path), fragment)
    local_args = ["cache", "build", "--teacher", student, "--data", data, "--out", tmp_path / "x"]
    assert_one_line_error(distill_cli(*local_args, "--concurrency", "4", cwd=tmp_path), "--concurrency applies to")
    assert_one_line_error(distill_cli(*args[:2], "--data", data, "--out", tmp_path / "y", cwd=tmp_path), "--base-url")


def test_the_service_builds_through_a_configured_teacher_endpoint(teacher, tmp_path):
    """kinds: a cache-build job with `api` (an endpoint of DISTILL_TEACHERS) and a finished job's student; the
    fields of a local build refused with it, an unknown endpoint refused at creation."""
    from _service import finished_lm_job
    from distill.service import db, files, kinds
    from distill.service.errors import ServiceError
    from distill.service.refs import Resolver
    from distill.service.settings import Settings
    from distill.stages import RunContext

    model, tokenizer, data, local = teacher
    app = scoring_app(model, tokenizer)
    with serve_app(app) as url:
        settings = Settings(data_dir=tmp_path / "data", teachers={"fake": (url, None)}).prepare()
        engine = db.open_engine(settings.url, pool_size=2)
        db.ensure_schema(engine)
        student = finished_lm_job(settings.data_dir)  # a tiny GPT-2 with the teacher's tokenizer
        upload = files.store_upload(settings, engine, data.open("rb"), "data.jsonl", "train", "local")
        raw = {"api": "fake", "model": "tiny", "student": student, "data": upload["id"], "top_k": K, "max_length": 32}
        resolver = Resolver(settings, engine)
        config = kinds.parse("cache-build", raw, settings, resolver)
        metrics = kinds.run("cache-build", config, RunContext(tmp_path / "job"), settings)
        for wrong, field in [({"api": "nowhere"}, "config.api"), ({"teacher": student}, "config.teacher"),
                             ({"temperature": 2.0}, "config.temperature")]:  # fmt: skip
            with pytest.raises(ServiceError) as caught:
                kinds.parse("cache-build", {**raw, **wrong}, settings, resolver)
            assert caught.value.status == 422 and caught.value.param == field, caught.value.message
        engine.dispose()
    assert metrics["top_k"] == K and metrics["served"]["scoring"] == "prompt_logprobs"
    assert metrics["served"]["rows_asked"] == 24 == len(app.state.prompts)
    assert_same_cache(tmp_path / "job" / "teacher-cache", local)
