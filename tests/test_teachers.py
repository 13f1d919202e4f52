import json

import pytest
import torch
import torch.nn.functional as F

from conftest import blobs, mlp
from distill.errors import CacheError, DistillError, ShapeMismatchError
from distill.teachers import CachedTeacher, EnsembleTeacher, LocalTeacher, TeacherOutput, build_cache
from distill.teachers.local import fingerprint


class Fixed:
    """A teacher that returns given log-probs for every batch."""

    def __init__(self, logprobs, temperature=1.0):
        self.logprobs = logprobs
        self.num_classes = logprobs.shape[-1]
        self.temperature = temperature

    def __call__(self, batch):
        return TeacherOutput(self.logprobs, temperature=self.temperature)


def test_local_teacher_returns_logprobs_without_gradients():
    model = mlp()
    teacher = LocalTeacher(model, 4)
    out = teacher({"inputs": torch.randn(5, 8)})
    assert out.logprobs.shape == (5, 4)
    assert torch.allclose(out.logprobs.exp().sum(-1), torch.ones(5))
    assert not out.logprobs.requires_grad
    assert not model.training


def test_ensemble_arithmetic_and_geometric_means():
    a = F.log_softmax(torch.randn(3, 5), -1)
    b = F.log_softmax(torch.randn(3, 5), -1)
    mean = EnsembleTeacher([Fixed(a), Fixed(b)], weights=[3, 1], mode="mean")({}).logprobs
    assert torch.allclose(mean.exp(), 0.75 * a.exp() + 0.25 * b.exp(), atol=1e-6)
    geo = EnsembleTeacher([Fixed(a), Fixed(b)], mode="geometric")({}).logprobs
    expected = F.log_softmax(0.5 * a + 0.5 * b, -1)
    assert torch.allclose(geo, expected, atol=1e-6)


def test_ensemble_undoes_member_temperature():
    logits = torch.randn(3, 5)
    at_two = F.log_softmax(logits / 2, -1)
    out = EnsembleTeacher([Fixed(at_two, temperature=2.0)])({}).logprobs
    assert torch.allclose(out, F.log_softmax(logits, -1), atol=1e-5)


def test_ensemble_rejects_bad_members_and_weights():
    a = F.log_softmax(torch.randn(3, 5), -1)
    with pytest.raises(ShapeMismatchError):
        EnsembleTeacher([Fixed(a), Fixed(F.log_softmax(torch.randn(3, 4), -1))])
    with pytest.raises(DistillError):
        EnsembleTeacher([Fixed(a)], weights=[1, 2])
    with pytest.raises(DistillError):
        EnsembleTeacher([Fixed(a), Fixed(a)], weights=[-1, 2])
    with pytest.raises(DistillError):
        EnsembleTeacher([])


def test_cache_round_trip_reuse_and_checks(tmp_path):
    data = blobs(100)
    teacher = LocalTeacher(mlp(), 4)
    cache = build_cache(teacher, data, tmp_path / "c", teacher_id="t1", data_id=data.fingerprint(), shard_rows=30)
    assert len(json.loads((tmp_path / "c" / "manifest.json").read_text())["shards"]) == 4
    index = torch.tensor([0, 57, 99])
    assert torch.allclose(cache({"index": index}).logprobs, teacher(data.batch(index)).logprobs)
    # reused as is by a second build for the same teacher and data
    again = build_cache(teacher, data, tmp_path / "c", teacher_id="t1", data_id=data.fingerprint())
    assert torch.equal(again.logprobs, cache.logprobs)
    with pytest.raises(CacheError, match="another teacher"):
        build_cache(teacher, data, tmp_path / "c", teacher_id="t2", data_id=data.fingerprint())
    with pytest.raises(CacheError, match="another teacher"):
        CachedTeacher(tmp_path / "c", teacher_id="t2")
    with pytest.raises(CacheError, match="other data"):
        CachedTeacher(tmp_path / "c", data_id="nope")


def test_corrupt_shard_is_detected(tmp_path):
    data = blobs(50)
    build_cache(LocalTeacher(mlp(), 4), data, tmp_path, teacher_id="t", data_id="d", shard_rows=20)
    shard = tmp_path / "logprobs-00001.npy"
    raw = bytearray(shard.read_bytes())
    raw[-5] ^= 0xFF
    shard.write_bytes(bytes(raw))
    with pytest.raises(CacheError, match="sha256"):
        CachedTeacher(tmp_path)
    shard.unlink()
    with pytest.raises(CacheError, match="missing"):
        CachedTeacher(tmp_path)


def test_malformed_manifest_and_missing_cache(tmp_path):
    with pytest.raises(CacheError, match="no manifest"):
        CachedTeacher(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(CacheError, match="not readable JSON"):
        CachedTeacher(tmp_path)


class Exploding:
    """Scores `allowed` batches, then raises (a build killed part-way)."""

    def __init__(self, inner, allowed):
        self.inner, self.allowed, self.calls = inner, allowed, 0
        self.num_classes = inner.num_classes

    def __call__(self, batch):
        self.calls += 1
        if self.calls > self.allowed:
            raise KeyboardInterrupt
        return self.inner(batch)


def test_killed_build_resumes_without_rescoring_finished_shards(tmp_path):
    data = blobs(100)
    inner = LocalTeacher(mlp(), 4)
    with pytest.raises(KeyboardInterrupt):
        build_cache(Exploding(inner, 5), data, tmp_path, teacher_id="t", data_id="d", batch_size=10, shard_rows=20)
    assert not (tmp_path / "manifest.json").exists()
    with pytest.raises(CacheError, match="did not finish"):
        CachedTeacher(tmp_path)
    counting = Exploding(inner, 10**6)
    cache = build_cache(counting, data, tmp_path, teacher_id="t", data_id="d", batch_size=10, shard_rows=20)
    assert counting.calls == 6  # shards 0 and 1 (40 rows) were kept; the other 60 rows take 6 batches of 10
    full = LocalTeacher(mlp(), 4)(data.batch(torch.arange(100))).logprobs
    assert torch.allclose(cache({"index": torch.arange(100)}).logprobs, full)


def test_fingerprint_changes_with_weights():
    a, b = mlp(seed=0), mlp(seed=1)
    assert fingerprint(a) == fingerprint(mlp(seed=0))
    assert fingerprint(a) != fingerprint(b)


def test_cache_at_temperature_serves_softened_targets(tmp_path):
    data = blobs(40)
    teacher = LocalTeacher(mlp(), 4)
    cache = build_cache(teacher, data, tmp_path, teacher_id="t", data_id="d")
    warm = cache.at_temperature(3.0)
    index = torch.arange(40)
    out = warm({"index": index})
    logits = mlp()(data.inputs).detach()
    assert out.temperature == 3.0
    assert torch.allclose(out.logprobs, F.log_softmax(logits / 3.0, -1), atol=1e-5)
    assert cache({"index": index}).temperature == 1.0  # the original is unchanged


def test_cache_of_ragged_texts_is_built_in_length_order_and_stored_in_row_order(tmp_path):
    from distill.data import TextDataset

    class BagOfWords(torch.nn.Module):  # its output for a row does not depend on the row's padding
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.EmbeddingBag(50, 3, mode="sum", padding_idx=0)

        def forward(self, input_ids, attention_mask):
            return self.embed(input_ids)

    generator = torch.Generator().manual_seed(0)
    rows = [torch.randint(1, 50, (int(n),), generator=generator).tolist() for n in torch.randint(1, 30, (70,))]
    data = TextDataset(rows, torch.zeros(70, dtype=torch.long), pad_id=0)
    teacher = LocalTeacher(BagOfWords(), 3)
    cache = build_cache(teacher, data, tmp_path / "c", teacher_id="bow", data_id="ragged", batch_size=8, shard_rows=32)
    index = torch.arange(70)
    expected = teacher(data.batch(index)).logprobs
    assert torch.allclose(cache(data.batch(index)).logprobs, expected, atol=1e-5)
