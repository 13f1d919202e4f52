"""The teacher LM top-k cache: round trip against the live teacher, losses, resume, corruption, refusals.

Run as a script (python tests/test_token_cache.py DIR) it builds the test cache slowly, for the SIGKILL test.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from distill.errors import CacheError
from distill.losses import forward_kl, reverse_kl
from distill.progress import Cancelled, RecordingReporter
from distill.teachers.token_cache import (
    TokenCache,
    build_scored_cache,
    build_token_cache,
    causal_lm_logits,
    verify_token_cache,
)
from distill.teachers.token_codec import Codec

V, K = 300, 16
SETTINGS = dict(
    top_k=K,
    temperature=1.5,
    teacher_name="tiny-gpt2",
    teacher_revision="r1",
    tokenizer_hash="tok",
    vocab_size=V,
    data_id="random-30",
)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run fastest on one thread, and much slower on two when the two cores are busy."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_lm(seed: int = 0) -> torch.nn.Module:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    config = transformers.GPT2Config(
        n_layer=2, n_embd=32, n_head=2, vocab_size=V, n_positions=64, bos_token_id=0, eos_token_id=0
    )
    model = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)  # sharper, more LM-like distributions than a random init gives
    return model


def data(n: int = 30, seed: int = 0) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Random sequences; the scored mask covers a 'completion' after a random prompt (at least one position)."""
    rng = np.random.default_rng(seed)
    sequences, scored = [], []
    for _ in range(n):
        length = int(rng.integers(2, 24))
        sequences.append(rng.integers(0, V, length))
        mask = np.arange(length) >= rng.integers(0, length - 1)
        mask[-1] = False
        scored.append(mask)
    return sequences, scored


def bigram(input_ids, attention_mask):
    """A teacher without transformers (quick to start in a subprocess): logits (B, T, V) looked up per token."""
    table = torch.randn(V, V, generator=torch.Generator().manual_seed(7)) * 3  # (V, V)
    return table[input_ids]


class Counting:
    """Wraps a teacher: counts its calls, raises after `allowed` of them, optionally sleeps in each."""

    def __init__(self, inner, allowed: int = 10**9, sleep: float = 0.0):
        self.inner, self.allowed, self.sleep, self.calls = inner, allowed, sleep, 0

    def __call__(self, input_ids, attention_mask):
        self.calls += 1
        if self.calls > self.allowed:
            raise KeyboardInterrupt
        time.sleep(self.sleep)
        return self.inner(input_ids, attention_mask)


def build(directory: Path, teacher=None, **overrides):
    sequences, scored = data()
    teacher = teacher if teacher is not None else causal_lm_logits(tiny_lm())
    options = {**SETTINGS, "batch_size": 4, "shard_tokens": 40, **overrides}
    return build_token_cache(teacher, sequences, directory, scored=scored, **options)


def exact(model, sequence: np.ndarray, temperature: float = 1.5):
    """The live teacher's exact top-K log-probs (T, K), ids (T, K) and log tail mass (T,), sequence scored alone."""
    with torch.no_grad():
        logits = model(input_ids=torch.from_numpy(sequence)[None]).logits[0]  # (T, V)
    logprobs = F.log_softmax(logits.float() / temperature, -1)  # (T, V)
    top, ids = logprobs.topk(K)  # (T, K)
    return top, ids, logprobs.scatter(-1, ids, float("-inf")).logsumexp(-1)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("cache")
    build(directory)
    return directory


def test_round_trip_matches_the_live_teacher(cache_dir):
    cache = TokenCache(cache_dir, expect={"teacher_name": "tiny-gpt2", "top_k": K, "temperature": 1.5})
    sequences, scored = data()
    length = max(len(s) for s in sequences) + 3
    out = cache.batch(np.arange(len(sequences)), length)
    assert out.logprobs.shape == out.token_ids.shape == (len(sequences), length, K)
    assert out.logprobs.dtype == torch.float32 and out.token_ids.dtype == torch.int64 and out.temperature == 1.5
    model, bound = tiny_lm(), cache.codec.kl_bound()
    for i, (sequence, mask) in enumerate(zip(sequences, scored)):
        top, ids, log_tail = exact(model, sequence)
        m = torch.from_numpy(mask)
        assert torch.equal(out.token_ids[i, : len(sequence)][m], ids[m])
        cached = out.logprobs[i, : len(sequence)][m]  # (n, K)
        assert (cached - top[m]).abs().max() <= cache.codec.step_max + 1e-3
        p = torch.cat([top[m], log_tail[m, None]], -1).double()  # (n, K+1) exact buckets
        q = torch.cat([cached, torch.log1p(-cached.exp().sum(-1, keepdim=True))], -1).double()  # cached buckets
        kl = (p.exp() * (p - q)).sum(-1)
        assert kl.max() <= bound and kl.min() >= -1e-6
        filler = ~torch.cat([m, torch.zeros(length - len(sequence), dtype=torch.bool)])  # unscored and padding
        assert torch.equal(out.logprobs[i, filler, 0], torch.zeros(int(filler.sum())))
        assert (out.logprobs[i, filler, 1:] == -100.0).all()
        assert torch.equal(out.token_ids[i, filler], torch.arange(K).expand(int(filler.sum()), K))
    # the Teacher protocol: batch["index"] and the padded width of batch["input_ids"]
    picked = cache({"index": torch.tensor([3, 0]), "input_ids": torch.zeros(2, length, dtype=torch.long)})
    assert torch.equal(picked.logprobs, out.logprobs[[3, 0]]) and torch.equal(picked.token_ids, out.token_ids[[3, 0]])


def test_sparse_loss_on_cached_outputs_equals_the_loss_on_the_exact_top_k(cache_dir):
    cache = TokenCache(cache_dir)
    sequences, scored = data()
    length = max(len(s) for s in sequences)
    teacher, student = tiny_lm(), tiny_lm(seed=1)
    input_ids = torch.zeros(len(sequences), length, dtype=torch.long)  # (B, T)
    mask = torch.zeros(len(sequences), length, dtype=torch.bool)  # (B, T)
    for i, (sequence, m) in enumerate(zip(sequences, scored)):
        input_ids[i, : len(sequence)] = torch.from_numpy(sequence)
        mask[i, : len(sequence)] = torch.from_numpy(m)
    cached = cache.batch(np.arange(len(sequences)), length)
    live_top, live_ids = cached.logprobs.clone(), cached.token_ids.clone()  # filler where unscored
    for i, sequence in enumerate(sequences):
        top, ids, _ = exact(teacher, sequence)
        live_top[i, : len(sequence)][mask[i, : len(sequence)]] = top[mask[i, : len(sequence)]]
        live_ids[i, : len(sequence)][mask[i, : len(sequence)]] = ids[mask[i, : len(sequence)]]
    with torch.no_grad():
        student_logits = student(input_ids=input_ids).logits  # (B, T, V)
    for loss in (forward_kl, reverse_kl):
        options = {"temperature": 1.5, "teacher_temperature": cached.temperature, "mask": mask}
        on_cache = loss(student_logits, cached.logprobs, token_ids=cached.token_ids, **options)
        on_live = loss(student_logits, live_top, token_ids=live_ids, **options)
        assert on_cache.item() == pytest.approx(on_live.item(), rel=2e-3, abs=1e-4)


def test_interrupted_build_resumes_without_rescoring(tmp_path):
    teacher = causal_lm_logits(tiny_lm())
    with pytest.raises(KeyboardInterrupt):
        build(tmp_path / "cut", Counting(teacher, allowed=5))
    with pytest.raises(CacheError, match="unfinished"):
        TokenCache(tmp_path / "cut")
    with pytest.raises(CacheError, match="unfinished"):
        verify_token_cache(tmp_path / "cut")
    done = sum(s["sequences"] for s in json.loads((tmp_path / "cut" / "partial.json").read_text())["shards"])
    assert 0 < done <= 20
    counting = Counting(teacher)
    build(tmp_path / "cut", counting)
    assert counting.calls == -(-(30 - done) // 4)  # only the sequences after the finished shards were scored
    build(tmp_path / "whole")
    a, b = TokenCache(tmp_path / "cut"), TokenCache(tmp_path / "whole")
    for x, y in zip(a.batch(range(30), 24).__dict__.values(), b.batch(range(30), 24).__dict__.values()):
        assert x == y if not isinstance(x, torch.Tensor) else torch.equal(x, y)
    again = Counting(teacher)
    build(tmp_path / "cut", again)  # finished: reused as it is
    assert again.calls == 0


def test_cancelled_build_raises_and_resumes(tmp_path):
    class CancelAfter(RecordingReporter):
        def __init__(self, steps):
            super().__init__()
            self.steps, self.done = steps, 0

        def advance(self, steps=1, **metrics):
            self.done += steps

        def cancelled(self):
            return self.done >= self.steps

    with pytest.raises(Cancelled):
        build(tmp_path, reporter=CancelAfter(60))
    reporter = CancelAfter(10**9)
    manifest = build(tmp_path, reporter=reporter)
    assert reporter.stages == ["teacher top-k cache"] and reporter.done == manifest["positions"]


def test_sigkill_mid_build_then_resume_loses_nothing(tmp_path):
    directory = tmp_path / "killed"
    process = subprocess.Popen([sys.executable, __file__, str(directory)])
    partial = directory / "partial.json"
    deadline = time.time() + 120
    while time.time() < deadline and process.poll() is None:
        if partial.exists() and len(json.loads(partial.read_text() or "{}").get("shards", [])) >= 2:
            break
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    assert process.returncode == -signal.SIGKILL, "the build ended before it could be killed"
    assert not (directory / "manifest.json").exists()
    done = sum(s["sequences"] for s in json.loads(partial.read_text())["shards"])
    counting = Counting(bigram)
    build(directory, counting)
    assert 0 < done < 30
    assert counting.calls == -(-(30 - done) // 4)  # the shards recorded before the kill were not rescored
    build(tmp_path / "whole", bigram)
    a, b = TokenCache(directory).batch(range(30), 24), TokenCache(tmp_path / "whole").batch(range(30), 24)
    assert torch.equal(a.logprobs, b.logprobs) and torch.equal(a.token_ids, b.token_ids)
    assert verify_token_cache(directory)["positions"] == verify_token_cache(tmp_path / "whole")["positions"]


def test_verify_summarises_and_catches_corruption(tmp_path):
    manifest = build(tmp_path)
    summary = verify_token_cache(tmp_path)
    assert summary["sequences"] == 30 and summary["positions"] == manifest["positions"] > 0 and summary["top_k"] == K
    assert summary["bytes_per_position"] == summary["bytes"] / summary["positions"]
    assert summary["shards"] == len(manifest["shards"]) > 2

    shard = tmp_path / manifest["shards"][1]["file"]
    original = shard.read_bytes()
    flipped = bytearray(original)
    flipped[-5] ^= 0x01
    shard.write_bytes(bytes(flipped))
    with pytest.raises(CacheError, match="sha256"):
        verify_token_cache(tmp_path)
    shard.unlink()
    with pytest.raises(CacheError, match="missing"):
        verify_token_cache(tmp_path)
    with pytest.raises(CacheError, match="missing"):
        TokenCache(tmp_path)
    shard.write_bytes(original)
    verify_token_cache(tmp_path)

    index = tmp_path / "index.npz"
    whole = index.read_bytes()
    index.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(CacheError, match="sha256"):
        verify_token_cache(tmp_path)
    with pytest.raises(CacheError, match="index"):
        TokenCache(tmp_path)
    index.write_bytes(whole)

    manifest_path = tmp_path / "manifest.json"
    good = json.loads(manifest_path.read_text())
    manifest_path.write_text(json.dumps({**good, "shards": [{"file": "x"}]}))
    with pytest.raises(CacheError, match="malformed"):
        verify_token_cache(tmp_path)
    manifest_path.write_text(json.dumps({**good, "positions": good["positions"] + 1}))
    with pytest.raises(CacheError, match="do not cover"):
        TokenCache(tmp_path)
    manifest_path.write_text("{not json")
    with pytest.raises(CacheError, match="not readable JSON"):
        TokenCache(tmp_path)
    manifest_path.unlink()
    with pytest.raises(CacheError, match="not a token cache"):
        verify_token_cache(tmp_path)


def test_mismatched_expectations_and_settings_are_refused(cache_dir, tmp_path):
    with pytest.raises(CacheError, match="teacher_revision 'r1', not 'r2'; top_k 16, not 8"):
        TokenCache(cache_dir, expect={"teacher_revision": "r2", "top_k": 8, "tokenizer_hash": "tok"})
    with pytest.raises(CacheError, match="temperature 1.5, not 1.0"):
        TokenCache(cache_dir, expect={"temperature": 1.0})
    with pytest.raises(ValueError, match="cannot expect"):
        TokenCache(cache_dir, expect={"colour": "red"})
    build(tmp_path)
    with pytest.raises(CacheError, match="other settings .*temperature 1.5, not 2.0"):
        build(tmp_path, temperature=2.0)
    with pytest.raises(CacheError, match="other settings .*data_sha256"):
        build_token_cache(causal_lm_logits(tiny_lm()), data(seed=1)[0], tmp_path, **SETTINGS)


def test_id_width_follows_the_vocabulary_size(tmp_path):
    assert Codec.for_sizes(K, 65_536).id_dtype == np.uint16
    assert Codec.for_sizes(K, 65_537).id_dtype == np.uint32
    assert Codec.for_sizes(128, 50_000).record_bytes <= 300

    def random_logits(input_ids, attention_mask):  # (B, T) -> (B, T, 70_000), deterministic in the ids
        generator = torch.Generator().manual_seed(int(input_ids.sum()))
        return torch.randn(*input_ids.shape, 70_000, generator=generator) * 4

    sequences = [np.array([1, 69_999, 5, 7]), np.array([65_536, 2, 3])]
    options = {**SETTINGS, "vocab_size": 70_000, "top_k": 4, "batch_size": 1}
    build_token_cache(random_logits, sequences, tmp_path, **options)
    cache = TokenCache(tmp_path)
    assert cache.records(np.arange(3))["ids"].dtype == np.uint32
    out = cache.batch([0], 4)
    logprobs = F.log_softmax(random_logits(torch.from_numpy(sequences[0])[None], None)[0, :3] / 1.5, -1)  # (3, V)
    assert torch.equal(out.token_ids[0, :3], logprobs.topk(4).indices)
    assert verify_token_cache(tmp_path)["id_dtype"] == "uint32"
    with pytest.raises(CacheError, match="expected"):  # a teacher whose vocabulary is not vocab_size
        build_token_cache(random_logits, sequences, tmp_path / "v", **{**options, "vocab_size": 80_000})


def test_codec_stays_within_its_bound_on_hard_distributions():
    codec = Codec.for_sizes(128, 4096)
    generator = torch.Generator().manual_seed(0)
    cliff = torch.cat([torch.zeros(8, 64), torch.full((8, 4032), -40.0)], -1)  # flat top, then nothing
    peaked = torch.randn(8, 4096, generator=generator) * 12
    flat = torch.randn(8, 4096, generator=generator) * 0.01
    zipf = -1.1 * torch.log(torch.arange(1, 4097.0)).expand(8, -1) + torch.randn(8, 4096, generator=generator) * 0.3
    for logits in (cliff, peaked, flat, zipf):
        logprobs = F.log_softmax(logits.double(), -1)  # (8, V)
        top, ids = logprobs.topk(128)
        log_tail = logprobs.scatter(-1, ids, float("-inf")).logsumexp(-1)
        records = codec.encode(top.numpy(), ids.numpy(), log_tail.numpy())
        decoded = codec.decode(records)
        assert np.array_equal(records["ids"], ids.numpy())
        p = torch.cat([top, log_tail[:, None]], -1)  # (8, K+1)
        q = torch.from_numpy(decoded).double()
        q = torch.cat([q, torch.log1p(-q.exp().sum(-1, keepdim=True).clamp_max(1 - 1e-12))], -1)
        kl = (p.exp() * (p - q).nan_to_num(posinf=0.0)).sum(-1)
        assert kl.max() <= codec.kl_bound() + 1e-6


def test_a_cache_scored_by_the_caller_resumes_and_keeps_its_notes(tmp_path):
    """build_scored_cache: records from the caller's `score`; identity fields must match to resume or reuse; notes
    go into the manifest; a `score` that returns the wrong records is refused."""
    sequences, scored = data()
    codec = Codec.for_sizes(K, V)
    teacher = causal_lm_logits(tiny_lm())
    asked: list[int] = []
    allowed = [3]  # batches before the build fails

    def score(rows: slice) -> np.ndarray:
        if allowed[0] == 0:
            raise RuntimeError("the teacher failed")
        allowed[0] -= 1
        asked.extend(range(rows.start, rows.stop))
        width = max(len(s) for s in sequences[rows])
        ids = torch.tensor(np.stack([np.pad(s, (0, width - len(s))) for s in sequences[rows]]))  # (B, T)
        logprobs = F.log_softmax(teacher(ids, torch.ones_like(ids)) / 1.5, -1)  # (B, T, V)
        chosen = logprobs[torch.from_numpy(np.stack([np.pad(m, (0, width - len(m))) for m in scored[rows]]))]
        top, top_ids = chosen.topk(K)  # (n, K)
        tail = chosen.scatter(-1, top_ids, float("-inf")).logsumexp(-1)  # (n,)
        return codec.encode(top.detach().numpy(), top_ids.numpy(), tail.detach().numpy())

    names = {k: v for k, v in SETTINGS.items() if k not in ("top_k", "vocab_size")}
    options = dict(scored=scored, codec=codec, identity={"asked_for": 16}, batch_size=4, shard_tokens=40, **names)
    with pytest.raises(RuntimeError, match="failed"):
        build_scored_cache(score, sequences, tmp_path, **options)
    done = json.loads((tmp_path / "partial.json").read_text())
    assert done["asked_for"] == 16 and done["shards"]
    first = sum(s["sequences"] for s in done["shards"])
    asked.clear()
    allowed[0] = 10**6
    manifest = build_scored_cache(score, sequences, tmp_path, notes=lambda: {"note": "kept"}, **options)
    assert asked == list(range(first, len(sequences)))  # only what the finished shards lack
    assert manifest["note"] == "kept" and manifest["asked_for"] == 16
    build(tmp_path / "reference")  # the same teacher through build_token_cache
    for i in range(len(sequences)):
        ours, theirs = TokenCache(tmp_path).batch([i], 24), TokenCache(tmp_path / "reference").batch([i], 24)
        assert torch.equal(ours.mask, theirs.mask)
        assert torch.allclose(ours.logprobs[ours.mask], theirs.logprobs[theirs.mask], atol=0.1)
    with pytest.raises(CacheError, match="asked_for"):  # a build asking for something else is not mixed in
        build_scored_cache(score, sequences, tmp_path, **{**options, "identity": {"asked_for": 20}})
    with pytest.raises(ValueError, match="records"):
        build_scored_cache(lambda rows: codec.encode(*[np.zeros((1, K))] * 2, np.zeros(1)), sequences,
                           tmp_path / "wrong", **options)  # fmt: skip


if __name__ == "__main__":  # the SIGKILL test's child: a slow build of the same cache
    torch.set_num_threads(1)
    build(Path(sys.argv[1]), Counting(bigram, sleep=0.15))
