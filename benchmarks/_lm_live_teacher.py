"""The live-teacher case of benchmarks/lm_loss_memory.py: one training step of a GPT-2 student (forward, the chunked
LM loss of `distill.lm.lm_terms`, backward) taught by

    live     a GPT-2 teacher model in the process (`LocalTeacher`: its log-probs formed chunk by chunk inside the
             loss from its final hidden states and head)
    cached   the same teacher's top-K log-probs, as a token cache hands them to a step ((B, T, K) values and ids)
    dense    the live teacher's full (B, T, V) log-probs (the path before the chunked teacher), for reference

Peak memory: each case runs in a fresh process, after a warm-up step on a tiny batch; the figure is the peak RSS
during one step minus the RSS just before it (after resetting the peak, /proc/self/clear_refs), so the weights of
both models (loaded before) are not counted and the step's activations, loss and gradients are. The teacher's
top-K for the cached case is computed once by the parent and handed over in a file.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from distill.config import LossConfig
from distill.lm import lm_terms
from distill.teachers import TeacherOutput
from distill.teachers.lm_head import chunked_top_k
from distill.teachers.local import LocalTeacher

CASES = ("live", "cached", "dense")


def gpt2(vocab: int, layers: int, width: int, heads: int, positions: int, seed: int) -> Any:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=vocab, n_positions=positions, n_embd=width, n_layer=layers, n_head=heads,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)  # fmt: skip
    torch.manual_seed(seed)
    return GPT2LMHeadModel._from_config(config, attn_implementation="sdpa")


def models(sizes: dict[str, int]) -> tuple[Any, Any]:
    """The student (2 x 512) and the teacher (4 x 1024) of the case, with the benchmark's vocabulary."""
    v, t = sizes["vocab"], sizes["sequence"]
    return gpt2(v, 2, 512, 8, t, seed=1), gpt2(v, 4, 1024, 16, t, seed=2)


def batch_of(sizes: dict[str, int], rows: int | None = None, length: int | None = None) -> dict[str, Any]:
    """Random token ids (B, T), every next token scored."""
    b, t = rows or sizes["batch"], length or sizes["sequence"]
    ids = torch.randint(0, sizes["vocab"], (b, t), generator=torch.Generator().manual_seed(0))  # (B, T)
    labels = torch.full((b, t), -100, dtype=torch.long)  # (B, T)
    labels[:, :-1] = ids[:, 1:]
    return {"inputs": {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, "labels": labels,
            "kd_mask": labels != -100, "index": torch.arange(b)}  # fmt: skip


class Cached:
    """The teacher's top-K as a cache gives them to a step."""

    def __init__(self, values: torch.Tensor, ids: torch.Tensor, vocab: int):
        self.values, self.ids, self.num_classes = values, ids, vocab  # (B, T, K) x2

    def __call__(self, batch: dict[str, Any]) -> TeacherOutput:
        b, t = batch["inputs"]["input_ids"].shape
        return TeacherOutput(self.values[:b, :t], self.ids[:b, :t])


class Dense:
    """The live teacher's full log-probs only (no `final_hidden`): the path before the chunked teacher."""

    def __init__(self, inner: LocalTeacher):
        self.inner, self.num_classes = inner, inner.num_classes

    def __call__(self, batch: dict[str, Any]) -> TeacherOutput:
        return self.inner(batch)


@torch.no_grad()
def teacher_top_k(sizes: dict[str, int], path: Path) -> None:
    """The teacher's top-K at every position of the batch, saved for the cached case."""
    _, teacher = models(sizes)
    found = LocalTeacher(teacher, sizes["vocab"]).final_hidden(batch_of(sizes))
    assert found is not None
    hidden = found.hidden.reshape(-1, found.hidden.shape[-1])  # (B*T, H_t)
    values, ids, _ = chunked_top_k(hidden, found.weight, found.bias, sizes["top_k"])  # (B*T, K) x2
    shape = (sizes["batch"], sizes["sequence"], -1)
    torch.save({"values": values.reshape(shape), "ids": ids.reshape(shape)}, path)


def step(student: Any, batch: dict[str, Any], teacher: Any, loss: LossConfig) -> float:
    terms, weights = lm_terms(student, batch, teacher, loss)
    total = sum(weights[k] * terms[k] for k in terms)
    assert isinstance(total, torch.Tensor)
    total.backward()
    return float(total.detach())


def measure(case: str, sizes: dict[str, int], divergence: str, top_k_path: Path, rss_kb: Any) -> dict[str, Any]:
    """In this (fresh) process: the peak RSS increase of one training step of `case`."""
    student, teacher_model = models(sizes)
    student.train()
    if case == "cached":
        saved = torch.load(top_k_path, weights_only=True)
        del teacher_model
        teacher: Any = Cached(saved["values"], saved["ids"], sizes["vocab"])
    else:
        live = LocalTeacher(teacher_model, sizes["vocab"])
        teacher = live if case == "live" else Dense(live)
    loss = LossConfig(temperature=1.0, alpha=0.5, divergence=divergence, beta=0.5, chunk_size=sizes["chunk_size"])
    step(student, batch_of(sizes, rows=1, length=16), teacher, loss)  # warm-up: kernels, lazy imports
    student.zero_grad(set_to_none=True)
    batch = batch_of(sizes)
    Path("/proc/self/clear_refs").write_text("5")  # the peak RSS (VmHWM) back to the current RSS
    before_kb = rss_kb("VmRSS")
    value = step(student, batch, teacher, loss)
    peak_kb = rss_kb("VmHWM")  # not ru_maxrss, which keeps the peak of the parent this process was forked from
    return {"peak_increase_mb": (peak_kb - before_kb) / 1024, "rss_before_mb": before_kb / 1024,
            "peak_mb": peak_kb / 1024, "loss": value}  # fmt: skip


def in_subprocess(script: str, case: str, sizes: dict[str, int], divergence: str, top_k_path: Path,
                  threads: int) -> dict[str, Any]:  # fmt: skip
    command = [sys.executable, script, "--live-case", case, "--live-sizes", json.dumps(sizes),
               "--live-divergence", divergence, "--live-top-k-file", str(top_k_path), "--threads", str(threads)]  # fmt: skip
    done = subprocess.run(command, check=True, capture_output=True, text=True)
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result
