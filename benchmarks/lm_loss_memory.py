"""Peak memory and speed of the chunked token-level distillation loss against the naive one.

Language-model distillation compares the student's and the teacher's next-token distributions over V classes at N
positions. The naive loss forms the full (N, V) logits of both models, their log-probs and the student's logit
gradient at once; `distill.chunked.chunked_token_loss` takes `--chunk-size` positions at a time and keeps only the
student's gradients (Liger-Kernel's fused linear distillation loss, which cuts peak memory by about 84 %).

Both variants compute forward KL at T = 1 between a student (hidden states (N, Hs) and head (V, Hs), both trained)
and a dense teacher given as hidden states (N, Ht) and head (V, Ht), and run forward + backward:

    naive    teacher log-probs (N, V) under no_grad, student logits (N, V), LOSSES["forward_kl"], backward
    chunked  chunked_token_loss(..., chunk_size), backward

Measured, with targets:

    memory ratio = chunked peak / naive peak                                          target <= 0.30
    speed        = naive seconds / chunked seconds (forward + backward)               target >= 0.90
    equality     = loss and gradients (student hidden, head) agree within float32 tolerance

Peak memory: each variant runs once in a fresh subprocess, after a tiny warm-up of both variants (kernels,
thread pools). On CPU the peak resident set size is reset just before the loss (writing 5 to /proc/self/clear_refs)
and the figure is the peak RSS (`ru_maxrss`) minus the RSS just before; the inputs themselves are not counted, the
gradients are. Where the reset is not allowed, the RSS peak before the loss is recorded too. On CUDA it is
`torch.cuda.max_memory_allocated` minus the memory allocated just before. Speed: one process times both variants
in every round, in alternating order; the figures are medians over rounds, the ratio is the median of the per-round
ratios (this machine's speed drifts between rounds, a paired ratio cancels the drift).

Default chunk size 1024, by measurement (`--sweep 256,512,2048`; 2 CPU cores, N = 4096, V = 32000, float32).
Peak increase: naive 3510 MB; chunk 2048: 1830 MB (0.52, misses the target); 1024: 959 MB (0.27); 512: 519 MB
(0.15); 256: 520-610 MB (its 31 MiB chunk tensors fall under glibc's 32 MiB mmap threshold, come from the heap and
fragment it: 300 MB with MALLOC_MMAP_THRESHOLD_=1048576). A chunk holds about seven (chunk, V) float32 tensors at its peak (131 MB each at 1024). Time of
forward + backward, quiet machine: naive 8.5 s, chunk 1024 8.2 s, chunk 512 8.3 s; paired medians on a loaded
machine: 1024 at 1.00-1.06x naive, 512 at 0.90-0.95x. So 1024 is the fastest chunk that meets the memory target;
512 halves the memory again for a few per cent of time (smaller products, more passes over the (V, H) heads) and
is the choice when memory is tight.

    python benchmarks/lm_loss_memory.py [--tokens 4096] [--vocab 32000] [--rounds 5] [--chunk-size 1024]
                                        [--sweep 256,512,2048]
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
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from distill.chunked import chunked_token_loss
from distill.losses import LOSSES

RESULTS = Path(__file__).parent / "results"
MEMORY_TARGET = 0.30  # chunked peak / naive peak, at most
SPEED_TARGET = 0.90  # naive seconds / chunked seconds, at least


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


def naive(inputs: dict[str, torch.Tensor], chunk_size: int) -> torch.Tensor:
    """Full logits of both models, the unchunked loss, backward. `chunk_size` is unused."""
    with torch.no_grad():
        teacher_logprobs = F.log_softmax(F.linear(inputs["teacher_hidden"], inputs["teacher_head"]), dim=-1)  # (N, V)
    student_logits = F.linear(inputs["student_hidden"], inputs["student_head"])  # (N, V)
    loss = LOSSES["forward_kl"](student_logits, teacher_logprobs, temperature=1.0)
    loss.backward()
    return loss.detach()


def chunked(inputs: dict[str, torch.Tensor], chunk_size: int) -> torch.Tensor:
    loss = chunked_token_loss(
        inputs["student_hidden"],
        inputs["student_head"],
        teacher_hidden=inputs["teacher_hidden"],
        teacher_head=inputs["teacher_head"],
        divergence="forward_kl",
        temperature=1.0,
        chunk_size=chunk_size,
    )
    loss.backward()
    return loss.detach()


Variant = Callable[[dict[str, torch.Tensor], int], torch.Tensor]
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
        fn(tiny, 16)
    del tiny
    inputs = make_inputs(args.tokens, args.vocab, args.student_hidden, args.teacher_hidden, args.device)
    if args.device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        variant(inputs, args.chunk_size)
        torch.cuda.synchronize()
        return {"peak_increase_mb": (torch.cuda.max_memory_allocated() - before) / 2**20, "method": "cuda"}
    peak_before_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    try:  # reset the peak RSS (VmHWM, which ru_maxrss reports) to the current RSS
        Path("/proc/self/clear_refs").write_text("5")
        reset = True
    except OSError:
        reset = False
    rss_before_kb = rss_kb("VmRSS")
    variant(inputs, args.chunk_size)
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "peak_increase_mb": (peak_kb - rss_before_kb) / 1024,
        "method": "ru_maxrss after resetting the peak" if reset else "ru_maxrss (no reset; see peak_before_mb)",
        "rss_before_mb": rss_before_kb / 1024,
        "peak_before_mb": None if reset else peak_before_kb / 1024,
        "peak_mb": peak_kb / 1024,
    }


def peak_in_subprocess(args: argparse.Namespace, variant: str, chunk_size: int) -> dict[str, Any]:
    command = [
        sys.executable, __file__, "--measure", variant, "--chunk-size", str(chunk_size), "--tokens", str(args.tokens),
        "--vocab", str(args.vocab), "--student-hidden", str(args.student_hidden),
        "--teacher-hidden", str(args.teacher_hidden), "--device", args.device, "--threads", str(args.threads),
    ]  # fmt: skip
    done = subprocess.run(command, check=True, capture_output=True, text=True)
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def timed(fn: Variant, inputs: dict[str, torch.Tensor], chunk_size: int, device: str) -> float:
    clear_grads(inputs)
    synchronize(device)
    start = time.perf_counter()
    fn(inputs, chunk_size)
    synchronize(device)
    return time.perf_counter() - start


def compare(inputs: dict[str, torch.Tensor], chunk_size: int) -> dict[str, Any]:
    """Loss and student gradients of both variants; equal within float32 tolerance (relative to the largest)."""
    results = {}
    for name, fn in VARIANTS.items():
        clear_grads(inputs)
        loss = fn(inputs, chunk_size)
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=4096, help="N, token positions scored")
    parser.add_argument("--vocab", type=int, default=32_000, help="V, vocabulary size")
    parser.add_argument("--student-hidden", type=int, default=512, help="Hs, the student's hidden size")
    parser.add_argument("--teacher-hidden", type=int, default=1024, help="Ht, the teacher's hidden size")
    parser.add_argument("--chunk-size", type=int, default=1024, help="positions per chunk of the chunked loss")
    parser.add_argument("--rounds", type=int, default=5, help="timing rounds (each times both variants)")
    parser.add_argument("--sweep", default="", help="comma-separated chunk sizes to measure as well, e.g. 256,512")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch CPU threads")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--measure", choices=sorted(VARIANTS), help=argparse.SUPPRESS)  # child process mode
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.measure:
        print(json.dumps(measure_peak(args)))
        return

    load_at_start = os.getloadavg()[0]  # other processes on the machine make the timings noisy
    chunk_sizes = [args.chunk_size] + [int(c) for c in args.sweep.split(",") if c and int(c) != args.chunk_size]
    peaks = {"naive": peak_in_subprocess(args, "naive", args.chunk_size)}
    for c in chunk_sizes:
        peaks[f"chunked_{c}"] = peak_in_subprocess(args, "chunked", c)

    inputs = make_inputs(args.tokens, args.vocab, args.student_hidden, args.teacher_hidden, args.device)
    equality = compare(inputs, args.chunk_size)  # also the warm-up of both variants
    timers = {"naive": (naive, 0)} | {f"chunked_{c}": (chunked, c) for c in chunk_sizes}
    names = list(timers)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(args.rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            fn, c = timers[name]
            times[name].append(timed(fn, inputs, c, args.device))
    median = {name: statistics.median(values) for name, values in times.items()}
    peak_mb = {name: float(peaks[name]["peak_increase_mb"]) for name in names}
    memory_ratio = {name: peak_mb[name] / peak_mb["naive"] for name in names}
    speed_rounds = {name: [n / t for n, t in zip(times["naive"], times[name])] for name in names}
    speed = {name: statistics.median(values) for name, values in speed_rounds.items()}

    print(f"N={args.tokens} V={args.vocab} Hs={args.student_hidden} Ht={args.teacher_hidden} device={args.device}")
    print(f"{'variant':<16}{'peak MB':>10}{'/ naive':>9}{'median s':>10}{'speed':>8}   all rounds (s)")
    for name in names:
        print(
            f"{name:<16}{peak_mb[name]:>10.0f}{memory_ratio[name]:>9.3f}"
            f"{median[name]:>10.3f}{speed[name]:>8.3f}   {', '.join(f'{t:.2f}' for t in times[name])}"
        )
    main_name = f"chunked_{args.chunk_size}"
    met = {
        "memory": memory_ratio[main_name] <= MEMORY_TARGET,
        "speed": speed[main_name] >= SPEED_TARGET,
        "equality": bool(equality["equal_within_float32_tolerance"]),
    }
    print(
        f"\nchunk {args.chunk_size}: memory {memory_ratio[main_name]:.3f} of naive (target <= {MEMORY_TARGET}), "
        f"speed {speed[main_name]:.3f}x naive (target >= {SPEED_TARGET}), "
        f"equal: {met['equality']}  (loss {equality['naive_loss']:.6f} vs {equality['chunked_loss']:.6f})"
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
            "divergence": "forward_kl",
            "temperature": 1.0,
            "teacher": "dense, hidden states + head",
        },
        "device": args.device,
        "rounds": args.rounds,
        "peak_memory": peaks,
        "memory_over_naive": memory_ratio,
        "seconds": median,
        "all_rounds": times,
        "speed_over_naive": speed,
        "speed_over_naive_rounds": speed_rounds,
        "equality": equality,
        "targets": {"memory_over_naive_at_most": MEMORY_TARGET, "speed_over_naive_at_least": SPEED_TARGET},
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
