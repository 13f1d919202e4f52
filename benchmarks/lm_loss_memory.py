"""Peak memory and speed of the chunked token-level distillation loss against the naive one, and the memory of a
training step with a live teacher against one with the teacher's cache.

Language-model distillation compares the student's and the teacher's next-token distributions over V classes at N
positions. The naive loss forms the full (N, V) logits of both models, their log-probs and the student's logit
gradient at once; `distill.chunked.chunked_token_loss` takes `--chunk-size` positions at a time into one reused
(chunk, V) logits buffer, computes the divergence on blocks of at most `BLOCK_ELEMENTS` (rows x V) and keeps only
the student's gradients (Liger-Kernel's fused linear distillation loss, which cuts peak memory by about 84 %).

Both variants compute forward KL, and the generalised JSD (beta 0.5) beside it, at T = 1 between a student (hidden
states (N, Hs) and head (V, Hs), both trained) and a dense teacher given as hidden states (N, Ht) and head (V, Ht),
and run forward + backward:

    naive    teacher log-probs (N, V) under no_grad, student logits (N, V), LOSSES[divergence], backward
    chunked  chunked_token_loss(..., chunk_size), backward

Measured, with targets (forward KL):

    memory ratio = chunked peak / naive peak                                          target <= 0.16
    speed        = naive seconds / chunked seconds (forward + backward)               target >= 1.0
    equality     = loss and gradients (student hidden, head) agree within float32 tolerance (both divergences)

The live-teacher case (`_lm_live_teacher`, CPU only; `--no-live` skips it): one training step (`distill.lm.lm_terms`,
forward and backward) of a GPT-2 student 2 x 512 taught by a GPT-2 teacher 4 x 1024 in the process (its log-probs
formed chunk by chunk from its final hidden states), by the same teacher's top-64 as its cache hands them to a
step, and by the teacher's full (B, T, V) log-probs (the path before), over N tokens (batches of 1,024) at V:

    live teacher peak / cached teacher peak                                           target <= 1.2

Peak memory: each variant runs once in a fresh subprocess, after a tiny warm-up (kernels, thread pools). On CPU the
peak resident set size is reset just before the measured call (writing 5 to /proc/self/clear_refs) and the figure
is the peak RSS (VmHWM; not `ru_maxrss`, which in a child also keeps its parent's peak) minus the RSS just before;
the inputs and the models' weights are not counted, the gradients are. Where the reset is not allowed, `ru_maxrss`
is recorded with the RSS peak before. On CUDA it is `torch.cuda.max_memory_allocated` minus the memory allocated
just before. Speed: one process times both variants in every round, in alternating order; the figures are medians
over rounds, the ratio is the median of the per-round ratios (this machine's speed drifts between rounds, a paired
ratio cancels the drift). The measured figures are in benchmarks/results/lm_loss_memory.json and the README.

    python benchmarks/lm_loss_memory.py [--tokens 4096] [--vocab 32000] [--rounds 3] [--chunk-size 1024]
                                        [--sweep 256,512,2048] [--threads N] [--no-live]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

import _lm_live_teacher as live
from distill.chunked import BLOCK_ELEMENTS, chunked_token_loss
from distill.losses import LOSSES

RESULTS = Path(__file__).parent / "results"
MEMORY_TARGET = 0.16  # chunked peak / naive peak, at most (forward KL)
SPEED_TARGET = 1.0  # naive seconds / chunked seconds, at least (forward KL)
LIVE_TARGET = 1.2  # a step's peak with the live teacher / with the cached teacher, at most
DIVERGENCES = ("forward_kl", "jsd")  # forward KL, and the generalised JSD of GKD beside it
BETA = 0.5


def make_inputs(
    tokens: int, vocab: int, student_width: int, teacher_width: int, device: str
) -> dict[str, torch.Tensor]:
    """Random hidden states and heads scaled so that the logits have unit variance, like a trained model's.
    Scaled in place, so that building them leaves no transient above the final resident size."""
    g = torch.Generator(device=device).manual_seed(0)

    def randn(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return torch.randn(*shape, generator=g, device=device).mul_(scale)

    return {
        "student_hidden": randn(tokens, student_width).requires_grad_(True),  # (N, Hs)
        "student_head": randn(vocab, student_width, scale=student_width**-0.5).requires_grad_(True),  # (V, Hs)
        "teacher_hidden": randn(tokens, teacher_width),  # (N, Ht)
        "teacher_head": randn(vocab, teacher_width, scale=teacher_width**-0.5),  # (V, Ht)
    }


def naive(inputs: dict[str, torch.Tensor], chunk_size: int, divergence: str) -> torch.Tensor:
    """Full logits of both models, the unchunked loss, backward. `chunk_size` is unused."""
    with torch.no_grad():
        teacher_logprobs = F.log_softmax(F.linear(inputs["teacher_hidden"], inputs["teacher_head"]), dim=-1)  # (N, V)
    student_logits = F.linear(inputs["student_hidden"], inputs["student_head"])  # (N, V)
    loss = LOSSES[divergence](student_logits, teacher_logprobs, temperature=1.0, beta=BETA)
    loss.backward()
    return loss.detach()


def chunked(inputs: dict[str, torch.Tensor], chunk_size: int, divergence: str) -> torch.Tensor:
    loss = chunked_token_loss(
        inputs["student_hidden"],
        inputs["student_head"],
        teacher_hidden=inputs["teacher_hidden"],
        teacher_head=inputs["teacher_head"],
        divergence=divergence,
        temperature=1.0,
        beta=BETA,
        chunk_size=chunk_size,
    )
    loss.backward()
    return loss.detach()


Variant = Callable[[dict[str, torch.Tensor], int, str], torch.Tensor]
VARIANTS: dict[str, Variant] = {"naive": naive, "chunked": chunked}


def clear_grads(inputs: dict[str, torch.Tensor]) -> None:
    for tensor in inputs.values():
        tensor.grad = None


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def rss_kb(field: str) -> int:
    """VmRSS or VmHWM (peak) of this process in kB, from /proc/self/status."""
    match = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.MULTILINE)
    if match is None:
        raise RuntimeError(f"no {field} in /proc/self/status")
    return int(match.group(1))


def measure_peak(args: argparse.Namespace) -> dict[str, Any]:
    """In this (fresh) process: the peak memory increase of one forward + backward of `args.measure`."""
    variant = VARIANTS[args.measure]
    tiny = make_inputs(64, 512, 16, 32, args.device)
    for fn in VARIANTS.values():  # warm-up: kernels, thread pools, lazy imports
        fn(tiny, 16, args.divergence)
    del tiny
    inputs = make_inputs(args.tokens, args.vocab, args.student_hidden, args.teacher_hidden, args.device)
    if args.device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        variant(inputs, args.chunk_size, args.divergence)
        torch.cuda.synchronize()
        return {"peak_increase_mb": (torch.cuda.max_memory_allocated() - before) / 2**20, "method": "cuda"}
    peak_before_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    try:  # reset the peak RSS (VmHWM, which ru_maxrss reports) to the current RSS
        Path("/proc/self/clear_refs").write_text("5")
        reset = True
    except OSError:
        reset = False
    rss_before_kb = rss_kb("VmRSS")
    variant(inputs, args.chunk_size, args.divergence)
    # VmHWM, not ru_maxrss: a child's ru_maxrss also keeps the peak of the parent it was forked from
    peak_kb = rss_kb("VmHWM") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "peak_increase_mb": (peak_kb - rss_before_kb) / 1024,
        "method": "VmHWM after resetting the peak" if reset else "ru_maxrss (no reset; see peak_before_mb)",
        "rss_before_mb": rss_before_kb / 1024,
        "peak_before_mb": None if reset else peak_before_kb / 1024,
        "peak_mb": peak_kb / 1024,
    }


def peak_in_subprocess(args: argparse.Namespace, variant: str, chunk_size: int, divergence: str) -> dict[str, Any]:
    command = [
        sys.executable, __file__, "--measure", variant, "--chunk-size", str(chunk_size), "--tokens", str(args.tokens),
        "--divergence", divergence,
        "--vocab", str(args.vocab), "--student-hidden", str(args.student_hidden),
        "--teacher-hidden", str(args.teacher_hidden), "--device", args.device, "--threads", str(args.threads),
    ]  # fmt: skip
    done = subprocess.run(command, check=True, capture_output=True, text=True)
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def timed(fn: Variant, inputs: dict[str, torch.Tensor], chunk_size: int, divergence: str, device: str) -> float:
    clear_grads(inputs)
    synchronize(device)
    start = time.perf_counter()
    fn(inputs, chunk_size, divergence)
    synchronize(device)
    return time.perf_counter() - start


def compare(inputs: dict[str, torch.Tensor], chunk_size: int, divergence: str) -> dict[str, Any]:
    """Loss and student gradients of both variants; equal within float32 tolerance (relative to the largest)."""
    results = {}
    for name, fn in VARIANTS.items():
        clear_grads(inputs)
        loss = fn(inputs, chunk_size, divergence)
        grads = {}
        for key in ("student_hidden", "student_head"):
            grad = inputs[key].grad  # kept here while the next variant gets fresh ones
            assert grad is not None
            grads[key] = grad
        results[name] = (loss, grads)
    (naive_loss, naive_grads), (chunked_loss, chunked_grads) = results["naive"], results["chunked"]
    report: dict[str, Any] = {"naive_loss": float(naive_loss), "chunked_loss": float(chunked_loss)}
    equal = torch.allclose(chunked_loss, naive_loss, rtol=1e-5, atol=1e-6)
    for key, expected in naive_grads.items():
        scale = float(expected.abs().max())
        diff = float((chunked_grads[key] - expected).abs().max())
        report[f"{key}_grad_max_abs_diff_over_max_abs"] = diff / scale
        equal = equal and torch.allclose(chunked_grads[key], expected, rtol=1e-4, atol=1e-5 * scale)
    report["equal_within_float32_tolerance"] = bool(equal)
    clear_grads(inputs)
    return report


def loss_case(args: argparse.Namespace, divergence: str, chunk_sizes: list[int]) -> dict[str, Any]:
    """Peak memory (fresh processes), equality and paired timings of the naive and chunked losses of `divergence`."""
    peaks = {"naive": peak_in_subprocess(args, "naive", args.chunk_size, divergence)}
    for c in chunk_sizes:
        peaks[f"chunked_{c}"] = peak_in_subprocess(args, "chunked", c, divergence)
    inputs = make_inputs(args.tokens, args.vocab, args.student_hidden, args.teacher_hidden, args.device)
    equality = compare(inputs, args.chunk_size, divergence)  # also the warm-up of both variants
    timers = {"naive": (naive, 0)} | {f"chunked_{c}": (chunked, c) for c in chunk_sizes}
    names = list(timers)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(args.rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            fn, c = timers[name]
            times[name].append(timed(fn, inputs, c, divergence, args.device))
    peak_mb = {name: float(peaks[name]["peak_increase_mb"]) for name in names}
    speed_rounds = {name: [n / t for n, t in zip(times["naive"], times[name])] for name in names}
    return {
        "peak_memory": peaks,
        "memory_over_naive": {name: peak_mb[name] / peak_mb["naive"] for name in names},
        "seconds": {name: statistics.median(values) for name, values in times.items()},
        "all_rounds": times,
        "speed_over_naive": {name: statistics.median(values) for name, values in speed_rounds.items()},
        "speed_over_naive_rounds": speed_rounds,
        "equality": equality,
    }


def live_case(args: argparse.Namespace, divergence: str, top_k_path: Path) -> dict[str, Any]:
    """Peak memory of a training step with the live, cached and dense teachers (`_lm_live_teacher`)."""
    sizes = live_sizes(args)
    peaks = {case: live.in_subprocess(__file__, case, sizes, divergence, top_k_path, args.threads)
             for case in live.CASES}  # fmt: skip
    cached = peaks["cached"]["peak_increase_mb"]
    return {"peak_memory": peaks, "over_cached": {c: p["peak_increase_mb"] / cached for c, p in peaks.items()}}


def live_sizes(args: argparse.Namespace) -> dict[str, int]:
    sequence = min(1024, args.tokens)
    return {"vocab": args.vocab, "sequence": sequence, "batch": max(1, args.tokens // sequence), "top_k": 64,
            "chunk_size": args.chunk_size}  # fmt: skip


def print_tables(args: argparse.Namespace, cases: dict[str, Any], lives: dict[str, Any]) -> None:
    print(f"N={args.tokens} V={args.vocab} Hs={args.student_hidden} Ht={args.teacher_hidden} device={args.device}")
    print(f"{'divergence':<12}{'variant':<16}{'peak MB':>10}{'/ naive':>9}{'median s':>10}{'speed':>8}   rounds (s)")
    for divergence, case in cases.items():
        for name, rounds in case["all_rounds"].items():
            print(
                f"{divergence:<12}{name:<16}{case['peak_memory'][name]['peak_increase_mb']:>10.0f}"
                f"{case['memory_over_naive'][name]:>9.3f}{case['seconds'][name]:>10.3f}"
                f"{case['speed_over_naive'][name]:>8.3f}   {', '.join(f'{t:.2f}' for t in rounds)}"
            )
    sizes = live_sizes(args)
    print(f"\ntraining step, GPT-2 student 2 x 512 and teacher 4 x 1024, batch {sizes['batch']} x {sizes['sequence']}, "
          f"V={args.vocab}, cached top-{sizes['top_k']}: peak MB over the RSS before the step")  # fmt: skip
    print(f"{'divergence':<12}{'teacher':<10}{'peak MB':>10}{'/ cached':>10}")
    for divergence, found in lives.items():
        for name, peak in found["peak_memory"].items():
            print(f"{divergence:<12}{name:<10}{peak['peak_increase_mb']:>10.0f}{found['over_cached'][name]:>10.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=4096, help="N, token positions scored")
    parser.add_argument("--vocab", type=int, default=32_000, help="V, vocabulary size")
    parser.add_argument("--student-hidden", type=int, default=512, help="Hs, the student's hidden size")
    parser.add_argument("--teacher-hidden", type=int, default=1024, help="Ht, the teacher's hidden size")
    parser.add_argument("--chunk-size", type=int, default=1024, help="positions per chunk of the chunked loss")
    parser.add_argument("--rounds", type=int, default=3, help="timing rounds (each times every variant)")
    parser.add_argument("--sweep", default="", help="comma-separated chunk sizes to measure as well, e.g. 256,512")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch CPU threads")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-live", action="store_true", help="skip the live-teacher training step")
    parser.add_argument("--measure", choices=sorted(VARIANTS), help=argparse.SUPPRESS)  # child process mode
    parser.add_argument("--divergence", default="forward_kl", help=argparse.SUPPRESS)  # of the child
    parser.add_argument("--live-case", choices=live.CASES, help=argparse.SUPPRESS)  # child: a training step
    parser.add_argument("--live-sizes", help=argparse.SUPPRESS)
    parser.add_argument("--live-divergence", help=argparse.SUPPRESS)
    parser.add_argument("--live-top-k-file", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.measure:
        print(json.dumps(measure_peak(args)))
        return
    if args.live_case:
        sizes = json.loads(args.live_sizes)
        print(json.dumps(live.measure(args.live_case, sizes, args.live_divergence, Path(args.live_top_k_file), rss_kb)))
        return

    load_at_start = os.getloadavg()[0]  # other processes on the machine make the timings noisy
    chunk_sizes = [args.chunk_size] + [int(c) for c in args.sweep.split(",") if c and int(c) != args.chunk_size]
    cases = {divergence: loss_case(args, divergence, chunk_sizes) for divergence in DIVERGENCES}
    lives: dict[str, Any] = {}
    if not args.no_live and args.device == "cpu":
        with tempfile.TemporaryDirectory() as work:
            top_k_path = Path(work) / "top_k.pt"
            live.teacher_top_k(live_sizes(args), top_k_path)
            lives = {divergence: live_case(args, divergence, top_k_path) for divergence in DIVERGENCES}
    print_tables(args, cases, lives)
    main_name = f"chunked_{args.chunk_size}"
    forward = cases["forward_kl"]
    met = {
        "memory": forward["memory_over_naive"][main_name] <= MEMORY_TARGET,
        "speed": forward["speed_over_naive"][main_name] >= SPEED_TARGET,
        "equality": all(bool(case["equality"]["equal_within_float32_tolerance"]) for case in cases.values()),
    }
    if lives:
        met["live_teacher"] = all(found["over_cached"]["live"] <= LIVE_TARGET for found in lives.values())
    print(
        f"\nforward KL, chunk {args.chunk_size}: memory {forward['memory_over_naive'][main_name]:.3f} of naive "
        f"(target <= {MEMORY_TARGET}), speed {forward['speed_over_naive'][main_name]:.3f}x naive "
        f"(target >= {SPEED_TARGET}); live teacher / cached teacher at most {LIVE_TARGET}"
    )
    print("targets met: " + ", ".join(f"{k} {'yes' if v else 'NO'}" for k, v in met.items()))

    RESULTS.mkdir(exist_ok=True)
    result = {
        "benchmark": "lm_loss_memory",
        "command": " ".join(["python benchmarks/lm_loss_memory.py", *sys.argv[1:]]),
        "sizes": {
            "tokens": args.tokens,
            "vocab": args.vocab,
            "student_hidden": args.student_hidden,
            "teacher_hidden": args.teacher_hidden,
            "chunk_size": args.chunk_size,
            "block_elements": BLOCK_ELEMENTS,
            "divergences": list(DIVERGENCES),
            "jsd_beta": BETA,
            "temperature": 1.0,
            "teacher": "dense, hidden states + head",
            "live_teacher_step": live_sizes(args) | {"student": "GPT-2 2 x 512", "teacher": "GPT-2 4 x 1024"},
        },
        "device": args.device,
        "rounds": args.rounds,
        "loss": cases,
        "live_teacher_step": lives,
        "targets": {
            "memory_over_naive_at_most": MEMORY_TARGET,
            "speed_over_naive_at_least": SPEED_TARGET,
            "live_over_cached_at_most": LIVE_TARGET,
        },  # fmt: skip
        "targets_met": met,
        "machine": {
            "cpu_threads": torch.get_num_threads(),
            "load_average_1min_at_start_and_end": [load_at_start, os.getloadavg()[0]],
            "python": platform.python_version(),
            "torch": torch.__version__,
            "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None,
        },
    }
    (RESULTS / "lm_loss_memory.json").write_text(json.dumps(result, indent=2))
    print(f"wrote {RESULTS / 'lm_loss_memory.json'}")


if __name__ == "__main__":
    main()
