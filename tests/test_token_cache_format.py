"""The token cache's stored format (version 2: ids entropy-coded, `token_shards` + `huffman`): round trip on LM-like
distributions, old (version 1) caches still read, and damaged, truncated, crafted or unknown caches refused clearly.

tests/data/token_cache_v1 is a cache written by the version-1 code (distill before the ids were entropy-coded) with
the `bigram` teacher of test_token_cache over its `data()`, K = 16, two shards.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from distill.errors import CacheError
from distill.teachers import huffman
from distill.teachers.token_cache import TokenCache, build_token_cache, verify_token_cache
from distill.teachers.token_codec import Codec
from distill.teachers.token_shards import layout, pack, rank_bands
from test_token_cache import SETTINGS, Counting, bigram, data, one_thread  # noqa: F401 (one_thread: autouse)

OLD = Path(__file__).parent / "data" / "token_cache_v1"
V_LM, K_LM = 2048, 128


def lm_like_teacher(vocab: int = V_LM, seed: int = 0):
    """Logits (B, T, V) as an LM's look: a Zipf prior over a shuffled vocabulary (some tokens are common everywhere)
    plus a context term of the previous token; deterministic."""
    generator = torch.Generator().manual_seed(seed)
    prior = -1.1 * torch.log(torch.arange(1, vocab + 1.0))[torch.randperm(vocab, generator=generator)]  # (V,)
    context = torch.randn(vocab, vocab, generator=generator) * 1.5  # (V, V)

    def logits(input_ids, attention_mask):
        return prior + context[input_ids]  # (B, T, V)

    return logits


def lm_data(n: int = 48, length: int = 30, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, V_LM, length) for _ in range(n)]


@pytest.fixture(scope="module")
def lm_cache(tmp_path_factory):
    directory = tmp_path_factory.mktemp("lm")
    options = {**SETTINGS, "vocab_size": V_LM, "top_k": K_LM, "temperature": 1.0}
    build_token_cache(lm_like_teacher(), lm_data(), directory, batch_size=16, shard_tokens=600, **options)
    return directory


def buckets(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """KL over the K + 1 buckets (top-K and tail) of exact log-probs p (n, K) and cached q (n, K), float64."""
    p_tail = torch.log1p(-p.exp().sum(-1, keepdim=True).clamp_max(1 - 1e-15))
    q_tail = torch.log1p(-q.exp().sum(-1, keepdim=True).clamp_max(1 - 1e-15))
    p, q = torch.cat([p, p_tail], -1), torch.cat([q, q_tail], -1)
    return (p.exp() * (p - q)).sum(-1)


def test_huffman_round_trip_across_blocks_and_long_codewords():
    rng = np.random.default_rng(0)
    skewed = 2 ** np.arange(40)  # the Huffman tree of these is 39 deep: limited to MAX_BITS
    lengths = huffman.code_lengths(skewed)
    assert lengths.max() == huffman.MAX_BITS and (2.0 ** -lengths.astype(float)).sum() == 1.0
    tables = [huffman.Table.from_lengths(lengths), huffman.Table.from_lengths(huffman.code_lengths(np.ones(7)))]
    n = huffman.ENCODE_ROWS + 300  # two blocks, the second not starting on a byte
    rows = np.stack([rng.choice(40, n), rng.integers(0, 7, n), rng.choice(40, n, p=skewed / skewed.sum())], 1)
    rows[5, 0] = 0  # the rarest symbol: a codeword of MAX_BITS bits, longer than the lookup
    bands = np.array([0, 1, 0])
    stream, offsets = huffman.encode(rows, tables, bands)
    words = huffman.words(np.concatenate([stream, np.zeros(8, np.uint8)]))
    assert np.array_equal(huffman.decode(words, offsets[:-1], offsets[1:], tables, bands), rows)
    picked = np.array([4200, 5, 17, 4095, 4096])
    assert np.array_equal(huffman.decode(words, offsets[picked], offsets[picked + 1], tables, bands), rows[picked])
    with pytest.raises(ValueError, match="exactly"):  # a row read from the wrong place
        huffman.decode(words, offsets[picked] + 1, offsets[picked + 1], tables, bands)
    with pytest.raises(ValueError, match="Kraft"):
        huffman.Table.from_lengths(np.array([1, 1, 1], np.uint8))
    with pytest.raises(ValueError, match="no codeword"):
        huffman.encode(np.array([[3]]), [huffman.Table.from_lengths(np.array([1, 1, 0, 0]))], np.array([0]))


def test_huffman_is_near_the_entropy_of_the_counts():
    counts = np.round(1e6 / np.arange(1, 3001) ** 1.1).astype(np.int64)  # Zipf over 3,000 symbols
    lengths = huffman.code_lengths(counts)
    p = counts / counts.sum()
    entropy = -(p * np.log2(p)).sum()
    assert entropy <= (p * lengths).sum() <= entropy + 0.05
    assert huffman.code_lengths(np.array([0, 5, 0])).tolist() == [0, 1, 0]  # a lone symbol still gets a codeword
    assert rank_bands(128).tolist() == [0, 1, 1] + [2] * 4 + [3] * 8 + [4] * 16 + [5] * 32 + [6] * 65
    assert rank_bands(1).tolist() == [0] and rank_bands(3).tolist() == [0, 1, 1]


def test_round_trip_on_lm_like_distributions(lm_cache):
    """Ids exact, log-probs within the grid, KL to the exact top-K far below 1e-4, and the ids in fewer bits than
    the version-1 record's 16 each."""
    cache = TokenCache(lm_cache)
    assert cache.version == 2 and len(cache.shards) > 1
    sequences = lm_data()
    out = cache.batch(np.arange(len(sequences)), 30)
    logits = lm_like_teacher()(torch.from_numpy(np.stack(sequences)), None)[:, :-1]  # (B, T-1, V)
    ids = F.log_softmax(logits.float(), -1).topk(K_LM).indices  # (B, T-1, K) as the build ranks them
    assert torch.equal(out.token_ids[:, :-1], ids)
    top = F.log_softmax(logits.double(), -1).gather(-1, ids)  # (B, T-1, K) exact
    cached = out.logprobs[:, :-1].double()  # (B, T-1, K)
    assert (cached - top).abs().max() <= cache.codec.step_max
    kl = buckets(top.flatten(0, 1), cached.flatten(0, 1))  # (positions,)
    assert kl.mean() < 1e-4 and kl.max() <= cache.codec.kl_bound()
    summary = verify_token_cache(lm_cache)
    id_bytes = sum(s["id_bits"] for s in cache.manifest["shards"]) / 8 / summary["positions"]
    assert id_bytes < 0.8 * K_LM * 2  # fewer than 12.8 bits an id, where version 1 stores 16
    assert summary["bytes_per_position"] < 0.85 * cache.codec.record_bytes and summary["format_version"] == 2


def test_a_version_1_cache_is_read_as_before(tmp_path):
    old = TokenCache(OLD)
    assert old.version == 1 and verify_token_cache(OLD)["format_version"] == 1
    sequences, scored = data()
    build_token_cache(bigram, sequences, tmp_path, scored=scored, **{**SETTINGS, "teacher_name": "bigram"},
                      batch_size=4, shard_tokens=100)  # fmt: skip
    new = TokenCache(tmp_path)
    assert new.version == 2
    a, b = old.batch(range(30), 24), new.batch(range(30), 24)  # the same teacher, data and record format
    assert torch.equal(a.token_ids, b.token_ids) and torch.equal(a.logprobs, b.logprobs) and torch.equal(a.mask, b.mask)
    for i, (sequence, mask) in enumerate(zip(sequences, scored)):
        logprobs = F.log_softmax(bigram(torch.from_numpy(sequence)[None], None)[0].double() / 1.5, -1)  # (T, V)
        top, ids = logprobs.topk(16)
        m = torch.from_numpy(mask)
        assert torch.equal(a.token_ids[i, : len(sequence)][m], ids[m])
        assert buckets(top[m], a.logprobs[i, : len(sequence)][m].double()).max() <= old.codec.kl_bound()
    copy = tmp_path / "old"
    shutil.copytree(OLD, copy)
    never = Counting(bigram, allowed=0)
    build_token_cache(never, sequences, copy, scored=scored, **{**SETTINGS, "teacher_name": "bigram"}, batch_size=4)
    assert never.calls == 0  # a finished version-1 cache of the same teacher and data is reused, not rescored


def rewrite_manifest(directory: Path, change) -> None:
    path = directory / "manifest.json"
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest))


@pytest.mark.parametrize("version", [3, 0, "2", None])
def test_an_unknown_format_version_is_refused(tmp_path, lm_cache, version):
    shutil.copytree(lm_cache, tmp_path / "c")
    rewrite_manifest(tmp_path / "c", lambda m: m.update(version=version))
    with pytest.raises(CacheError, match=f"format version {version!r}, which this version of distill does not read"):
        TokenCache(tmp_path / "c")
    with pytest.raises(CacheError, match="does not read"):
        verify_token_cache(tmp_path / "c")
    rewrite_manifest(tmp_path / "c", lambda m: m.update(version=2, format="something-else"))
    with pytest.raises(CacheError, match="not a distill-token-cache manifest"):
        TokenCache(tmp_path / "c")


def shard_file(directory: Path) -> tuple[Path, dict]:
    entry = json.loads((directory / "manifest.json").read_text())["shards"][0]
    return directory / entry["file"], entry


def save_shard(directory: Path, array: np.ndarray, **entry_fields) -> None:
    """Write `array` as the first shard and make the manifest agree (its sha256 too): a crafted cache."""
    path, _ = shard_file(directory)
    np.save(path, array)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    rewrite_manifest(directory, lambda m: m["shards"][0].update(sha256=digest, **entry_fields))


def test_truncated_and_corrupt_shards_are_refused(tmp_path, lm_cache):
    directory = tmp_path / "c"
    shutil.copytree(lm_cache, directory)
    path, entry = shard_file(directory)
    whole = path.read_bytes()
    path.write_bytes(whole[: len(whole) - 100])  # truncated
    with pytest.raises(CacheError, match="sha256"):
        verify_token_cache(directory)
    with pytest.raises(CacheError, match="unreadable|truncated"):
        TokenCache(directory)
    array = np.load(io.BytesIO(whole))
    save_shard(directory, array[:-100])  # a whole .npy, but shorter than the manifest's counts make it
    with pytest.raises(CacheError, match="truncated or not this cache's"):
        TokenCache(directory)
    save_shard(directory, array.astype(np.uint16))  # another dtype
    with pytest.raises(CacheError, match="not the"):
        TokenCache(directory)
    stream = layout(TokenCache(lm_cache).codec, entry["rows"], entry["id_bits"])["stream"]
    flipped = array.copy()
    flipped[stream[0] : stream[0] + stream[1] - 8] ^= 0x5A  # every byte of the ids damaged, sha256 made to agree
    save_shard(directory, flipped)
    cache = TokenCache(directory)
    with pytest.raises(CacheError, match="do not decode"):
        cache.batch(np.arange(4), 30)
    with pytest.raises(CacheError, match="do not decode"):
        verify_token_cache(directory)


def test_crafted_offsets_codes_and_manifests_are_refused(tmp_path, lm_cache):
    directory = tmp_path / "c"
    shutil.copytree(lm_cache, directory)
    path, entry = shard_file(directory)
    array = np.load(path)
    codec = TokenCache(lm_cache).codec
    sections = layout(codec, entry["rows"], entry["id_bits"])
    offsets = sections["offsets"]
    crafted = array.copy()
    crafted[offsets[0] + 4 : offsets[0] + 8] = 255  # position 1 starts past the end of the stream
    save_shard(directory, crafted)
    with pytest.raises(CacheError, match="offsets outside its id stream"):
        TokenCache(directory).batch([0], 30)
    crafted = array.copy()
    code = sections["code"]
    crafted[code[0] : code[0] + code[1]] = 1  # every id a 1-bit codeword: no prefix code
    save_shard(directory, crafted)
    with pytest.raises(CacheError, match="broken code"):
        TokenCache(directory).batch([0], 30)
    save_shard(directory, array)
    TokenCache(directory).batch([0], 30)
    for bad in (-1, "many", None):
        rewrite_manifest(directory, lambda m, bad=bad: m["shards"][0].update(id_bits=bad))
        with pytest.raises(CacheError, match="malformed"):
            TokenCache(directory)
    rewrite_manifest(directory, lambda m: m["shards"][0].update(id_bits=entry["id_bits"] + 64))
    with pytest.raises(CacheError, match="not the"):  # the sections no longer match the file's size
        TokenCache(directory)
    rewrite_manifest(directory, lambda m: m["shards"][0].pop("id_bits"))
    with pytest.raises(CacheError, match="malformed"):
        TokenCache(directory)


def test_a_record_with_an_id_outside_the_vocabulary_is_not_written(tmp_path):
    codec = Codec.for_sizes(4, 10)
    records = codec.encode(np.log(np.full((2, 4), 0.2)), np.array([[0, 1, 2, 3], [4, 5, 6, 10]]), np.log([0.2, 0.2]))
    with pytest.raises(ValueError, match="outside the vocabulary of 10"):
        pack(records, codec)


@pytest.mark.parametrize("top_k", [1, 2, 3, 300])
def test_any_k_round_trips(tmp_path, top_k):
    """One rank band (K = 1, 2), two (K = 3), and K = V (every id in every position: a flat code, no tail)."""
    sequences, scored = data()
    build_token_cache(bigram, sequences, tmp_path, scored=scored, **{**SETTINGS, "top_k": top_k}, shard_tokens=60)
    out = TokenCache(tmp_path).batch(range(30), 24)
    for i, (sequence, mask) in enumerate(zip(sequences, scored)):
        logprobs = F.log_softmax(bigram(torch.from_numpy(sequence)[None], None)[0] / 1.5, -1)  # (T, V)
        m = torch.from_numpy(mask)
        assert torch.equal(out.token_ids[i, : len(sequence)][m], logprobs.topk(top_k).indices[m])
    assert verify_token_cache(tmp_path)["format_version"] == 2
