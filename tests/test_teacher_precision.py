"""A large teacher in half precision: `cache build --precision bf16` and train-lm's live teacher load its weights in
that dtype (never whole in float32), and the cache it scores stays near the float32 one."""

import json

import numpy as np
import pytest
import torch

from conftest import tiny_gpt2
from distill import hf
from distill.teachers.token_cache import TokenCache
from test_cli import assert_one_line_error, distill_cli

ROWS = [{"prompt": "q : the dog runs", "completion": "a : the dog plays"}, {"text": "the cat is happy and sad"}] * 3


def test_a_causal_lm_loads_in_the_precision_asked_for(tmp_path):
    tiny_gpt2(tmp_path / "teacher", layers=2)
    assert next(hf.load_causal_lm(tmp_path / "teacher").parameters()).dtype == torch.float32
    for precision, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16), ("fp32", torch.float32)):
        model = hf.load_causal_lm(tmp_path / "teacher", precision=precision)
        assert {p.dtype for p in model.parameters()} == {dtype}, precision


def test_a_cache_built_in_bf16_is_near_the_float32_one_and_says_its_precision(tmp_path):
    tiny_gpt2(tmp_path / "teacher", layers=2, seed=3)
    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in ROWS) + "\n")
    caches = {}
    for precision in ("fp32", "bf16"):
        directory = tmp_path / f"cache-{precision}"
        manifest = hf.build_lm_cache(tmp_path / "teacher", data, directory, top_k=8, max_length=32,
                                     precision=precision)  # fmt: skip
        assert manifest["teacher_revision"].endswith("+bf16") == (precision == "bf16")
        caches[precision] = TokenCache(directory)
    full, half = (caches[p].batch(np.arange(len(ROWS)), 32) for p in ("fp32", "bf16"))
    mask = full.mask  # (B, T)
    assert torch.equal(mask, half.mask) and mask.sum() > 20
    top_full, top_half = full.logprobs[mask][:, 0], half.logprobs[mask][:, 0]  # (n,)
    assert (
        full.token_ids[mask][:, 0] == half.token_ids[mask][:, 0]
    ).float().mean() > 0.9  # the same first choice nearly always
    assert (top_full - top_half).abs().max() < 0.05  # bf16 keeps 8 bits of mantissa: log-probs within a few 1e-2
    assert not torch.equal(top_full, top_half)  # and it did run in bf16


@pytest.mark.parametrize(
    "device, fragment",
    [("nonsense", "'nonsense' is not a device"), ("cuda:7", "cannot run on cuda:7"), ("meta", "cannot run on meta")],
)
def test_a_device_this_machine_lacks_is_one_line_before_anything_loads(tmp_path, device, fragment):
    if device == "cuda:7" and torch.cuda.device_count() > 7:
        pytest.skip("this machine has eight GPUs")
    tiny_gpt2(tmp_path / "teacher", layers=1)
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(r) for r in ROWS) + "\n")
    built = distill_cli("cache", "build", "--teacher", "teacher", "--data", "train.jsonl", "--out", "cache",
                        "--device", device, cwd=tmp_path)  # fmt: skip
    assert_one_line_error(built, fragment)
    assert not (tmp_path / "cache").exists()
    (tmp_path / "job.yaml").write_text("student: teacher\ndata: train.jsonl\nmax_length: 16\n")
    trained = distill_cli("train-lm", "--config", "job.yaml", "--set", f"train.device={device}", cwd=tmp_path)
    assert_one_line_error(trained, fragment)
