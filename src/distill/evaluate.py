"""Metrics: how much of the teacher a student kept, and what it saved.

Quality: accuracy, retention (student / teacher), gap closed ((distilled - alone) / (teacher - alone)), top-1
agreement with the teacher, KL(teacher || student), expected calibration error with its reliability table.
Cost: parameters, size on disk, CPU latency at batch 1 and throughput at batch 256, measured for all models side by
side (interleaved rounds on the same machine at the same time), giving speed-up and compression.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distill.data import Dataset
from distill.errors import DistillError
from distill.lm_data import LMDataset
from distill.teachers import Teacher
from distill.teachers.local import logits_of, run_model, to_device


@torch.no_grad()
def predict(model: nn.Module | Callable[[Any], Any], data: Tensor | Dataset, batch_size: int = 1024) -> Tensor:
    """Logits (N, C) of a model over inputs (N, ...) or over a dataset's batches, in eval mode."""
    device = torch.device("cpu")
    if isinstance(model, nn.Module):
        model.eval()
        device = next(iter(model.parameters()), torch.empty(0)).device
    outputs = []
    for index in torch.arange(len(data)).split(batch_size):
        inputs = data[index] if isinstance(data, Tensor) else data.batch(index)["inputs"]
        outputs.append(logits_of(run_model(model, to_device(inputs, device))).float().cpu())  # type: ignore[arg-type]
    return torch.cat(outputs) if outputs else torch.zeros(0)


@torch.no_grad()
def teacher_logprobs(teacher: Teacher, data: Tensor | Dataset, batch_size: int = 1024) -> Tensor:
    """A teacher's dense log-probs (N, C) over inputs or a dataset (the index key is the row number)."""
    parts = []
    for index in torch.arange(len(data)).split(batch_size):
        batch = {"inputs": data[index], "index": index} if isinstance(data, Tensor) else data.batch(index)
        output = teacher(batch).logprobs
        if output is None:
            raise DistillError("the teacher gives no log-probs to evaluate against")
        parts.append(output.float().cpu())
    return torch.cat(parts)


def accuracy(logits: Tensor, labels: Tensor) -> float:
    """Share of rows whose arg-max is the label. (N, C), (N,) -> float"""
    return float((logits.argmax(-1) == labels).float().mean())


def agreement(student_logits: Tensor, teacher_logits: Tensor) -> float:
    """Share of rows where student and teacher predict the same class (top-1)."""
    return float((student_logits.argmax(-1) == teacher_logits.argmax(-1)).float().mean())


def kl_to_teacher(student_logits: Tensor, teacher_logits: Tensor) -> float:
    """Mean KL(teacher || student) in nats at temperature 1."""
    log_q = F.log_softmax(student_logits.float(), -1)  # (N, C)
    log_p = F.log_softmax(teacher_logits.float(), -1)  # (N, C)
    return float((log_p.exp() * (log_p - log_q)).sum(-1).mean())


@dataclass
class Reliability:
    """Per confidence bin: mean confidence, accuracy and number of rows; plus the expected calibration error."""

    ece: float
    confidence: list[float]
    accuracy: list[float]
    count: list[int]
    edges: list[float]


def calibration(logits: Tensor, labels: Tensor, bins: int = 15) -> Reliability:
    """Expected calibration error (Guo et al. 2017): sum over equal-width confidence bins of
    (rows in bin / N) * |accuracy(bin) - confidence(bin)|."""
    probs = F.softmax(logits.float(), -1)  # (N, C)
    confidence, predicted = probs.max(-1)  # (N,), (N,)
    correct = (predicted == labels).float()
    edges = torch.linspace(0, 1, bins + 1)
    ece = 0.0
    conf_out, acc_out, counts = [], [], []
    for lo, hi in zip(edges[:-1], edges[1:]):
        inside = (confidence > lo) & (confidence <= hi) if lo > 0 else (confidence >= lo) & (confidence <= hi)
        n = int(inside.sum())
        counts.append(n)
        if n:
            c, a = float(confidence[inside].mean()), float(correct[inside].mean())
            ece += n / len(labels) * abs(a - c)
        else:
            c, a = float((lo + hi) / 2), float("nan")
        conf_out.append(c)
        acc_out.append(a)
    return Reliability(ece=ece, confidence=conf_out, accuracy=acc_out, count=counts, edges=[float(e) for e in edges])


def gap_closed(distilled: float, alone: float, teacher: float) -> float | None:
    """(distilled - alone) / (teacher - alone): 1 = the student reached the teacher, 0 = distillation did nothing.
    None when the teacher is no better than the student alone (the ratio has no meaning then)."""
    if teacher - alone <= 1e-9:
        return None
    return (distilled - alone) / (teacher - alone)


@dataclass
class Speed:
    latency_ms: float  # median time of one batch-1 forward pass
    throughput: float  # rows per second at batch `batch_size`


def example_inputs(example: Tensor, batch_size: int = 256) -> tuple[Tensor, Tensor]:
    """Inputs of batch 1 and of `batch_size` made of one row (no batch dimension), for `measure_speed`."""
    return example.unsqueeze(0), example.unsqueeze(0).expand(batch_size, *example.shape).contiguous()


def _rows(inputs: Any) -> int:
    first = next(iter(inputs.values())) if isinstance(inputs, dict) else inputs
    return int(first.shape[0])


@torch.inference_mode()
def measure_speed(
    models: Mapping[str, Callable[..., object]],
    single: Any,
    batch: Any,
    *,
    rounds: int = 7,
    min_seconds: float = 0.05,
    inputs: dict[str, tuple[Any, Any]] | None = None,
) -> dict[str, Speed]:
    """CPU latency at batch 1 and throughput (rows per second) at a larger batch, for every model side by side.

    `single` and `batch` are model inputs (a tensor, or a dict of tensors for tokenized text); `inputs` gives other
    ones to some models (a student with its own tokenizer), as (single, batch) of the same texts. Each round times
    every model in turn (the order alternates between rounds), so load on the machine affects all of them alike;
    the reported figure is the median over rounds.
    """
    pairs = {name: (inputs or {}).get(name, (single, batch)) for name in models}
    for name, model in models.items():  # warm-up
        for _ in range(3):
            run_model(model, pairs[name][0])  # type: ignore[arg-type]
        run_model(model, pairs[name][1])  # type: ignore[arg-type]

    def timed(fn: Callable[..., object], inputs: Any) -> float:
        calls, start = 0, time.perf_counter()
        while True:
            run_model(fn, inputs)  # type: ignore[arg-type]
            _synchronize()
            calls += 1
            elapsed = time.perf_counter() - start
            if elapsed >= min_seconds and calls >= 3:
                return elapsed / calls

    latency: dict[str, list[float]] = {name: [] for name in models}
    batch_time: dict[str, list[float]] = {name: [] for name in models}
    names = list(models)
    for r in range(rounds):
        for name in names if r % 2 == 0 else reversed(names):
            latency[name].append(timed(models[name], pairs[name][0]))
            batch_time[name].append(timed(models[name], pairs[name][1]))
    return {
        name: Speed(
            latency_ms=1000 * statistics.median(latency[name]),
            throughput=_rows(pairs[name][1]) / statistics.median(batch_time[name]),
        )
        for name in names
    }


def _synchronize() -> None:
    """Wait for queued GPU work, so that a timing covers it (CUDA runs asynchronously)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def spearman(predicted: Tensor, gold: Tensor) -> float:
    """Spearman rank correlation (ties get their average rank), as reported on STS-B."""
    from scipy.stats import spearmanr

    return float(spearmanr(predicted.double().numpy(), gold.double().numpy()).statistic)


@torch.no_grad()
def lm_scores(
    model: nn.Module,
    data: LMDataset,
    teacher: nn.Module | None = None,
    batch_size: int = 32,
    device: torch.device | None = None,
    byte_lengths: Tensor | None = None,
) -> dict[str, float]:
    """Over the scored tokens of `data`: perplexity = exp(mean CE); with a teacher, the mean KL(teacher || model)
    and the share of tokens where both rank the same token first; with `byte_lengths` (V,) (each token's length in
    bytes of text, 0 for a special token), bits per byte = sum CE / ln 2 / bytes predicted, which compares models
    of different tokenizers. Batches go to `device` (where the models are)."""
    model.eval()
    totals = {"ce": 0.0, "kl": 0.0, "agree": 0.0, "tokens": 0.0, "bytes": 0.0}
    for index in torch.arange(len(data)).split(batch_size):
        batch = data.batch(index) if device is None else to_device(data.batch(index), device)
        mask = batch["kd_mask"]  # (B, T)
        logits = model(**batch["inputs"]).logits.float()[mask]  # (N, V)
        labels = batch["labels"][mask]  # (N,)
        totals["ce"] += float(F.cross_entropy(logits, labels, reduction="sum"))
        totals["tokens"] += float(mask.sum())
        if byte_lengths is not None:
            totals["bytes"] += float(byte_lengths.to(labels.device)[labels].sum())
        if teacher is not None:
            teacher.eval()
            teacher_logits = teacher(**batch["inputs"]).logits.float()[mask]  # (N, V_t)
            common = min(teacher_logits.shape[-1], logits.shape[-1])  # tables padded to other sizes: the shared rows
            teacher_logits, ours = teacher_logits[:, :common], logits[:, :common]  # (N, V)
            log_p, log_q = F.log_softmax(teacher_logits, -1), F.log_softmax(ours, -1)
            totals["kl"] += float((log_p.exp() * (log_p - log_q)).sum())
            totals["agree"] += float((teacher_logits.argmax(-1) == ours.argmax(-1)).sum())
    n = max(totals["tokens"], 1.0)
    scores = {"perplexity": math.exp(totals["ce"] / n), "tokens": int(totals["tokens"])}
    if byte_lengths is not None:
        scores["bits_per_byte"] = totals["ce"] / math.log(2) / max(totals["bytes"], 1.0)
    if teacher is not None:
        scores.update(kl_to_teacher=totals["kl"] / n, agreement=totals["agree"] / n)
    return scores
