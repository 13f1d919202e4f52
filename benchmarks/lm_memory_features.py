"""What the LLM-scale settings of the training loop save: activation checkpointing's memory, LoRA's optimizer
state, and the step time of bf16 autocast against float32.

The student is a GPT-2 of 8 layers (`--width` wide, `--heads` heads, a `--vocab` token vocabulary) trained on
random token sequences of `--seq` tokens, `--batch` a step, through `distill.train.train` on the LM path (the
chunked cross-entropy over every next token: fine-tuning, the student's side of any distillation run; a teacher
adds its own weights and forward to every configuration alike). Each configuration trains `--steps` optimizer
steps in a fresh process with one torch thread:

    fp32          float32, activations kept                          the reference
    checkpointed  float32, train.activation_checkpointing: true      each block's activations recomputed in backward
    bf16          train.precision: bf16 (autocast; weights and optimizer state stay float32)

Measured, with targets:

    memory   = the peak resident memory that training adds (peak RSS during `train` minus the RSS just before it,
               after the model, the data and the imports are in memory: activations, gradients, optimizer state),
               checkpointed / fp32                                                       target <= 0.6
               (the whole process's peak RSS, imports and weights included, is recorded too)
    lora     = the optimizer state (AdamW's two moments, bytes of its tensors after one step) of a LoRA adapter
               (peft, r = 16, alpha = 32, all linear layers of the blocks) / that of full fine-tuning   target <= 0.1
    bf16     = bf16 seconds per step / fp32 seconds per step     recorded (on CPUs it depends on bf16 support)

Peak memory: the child resets its peak RSS (writing 5 to /proc/self/clear_refs) just before `train` and reads
`ru_maxrss` after it. Step time: the median of the steps after the first (which allocates the optimizer state) in
each run; the rounds interleave the configurations (fp32, checkpointed, bf16, then rotated), each ratio is taken
within a round and the figure is the median over rounds (the machine's speed drifts between rounds; a paired
ratio cancels the drift).

    python benchmarks/lm_memory_features.py [--rounds 3] [--width 256] [--heads 8] [--vocab 8192] [--seq 1024]
                                            [--batch 2] [--steps 3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).parent / "results"
LAYERS = 8
MEMORY_TARGET = 0.6  # checkpointed training memory / fp32's, at most
LORA_TARGET = 0.1  # LoRA optimizer state / full fine-tuning's, at most
CONFIGS: dict[str, dict[str, Any]] = {
    "fp32": {},
    "checkpointed": {"activation_checkpointing": True},
    "bf16": {"precision": "bf16"},
}


def student(args: argparse.Namespace) -> Any:
    """A GPT-2 of LAYERS blocks with the given width, heads and vocabulary, fixed by a seed."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=args.vocab, n_positions=args.seq, n_embd=args.width, n_layer=LAYERS,
                        n_head=args.heads, bos_token_id=0, eos_token_id=0, pad_token_id=0)  # fmt: skip
    torch.manual_seed(0)
    return GPT2LMHeadModel(config)


def token_data(args: argparse.Namespace, rows: int) -> Any:
    """`rows` random sequences of `args.seq` tokens, every next token scored."""
    from distill.lm_data import LMDataset

    g = torch.Generator().manual_seed(1)
    sequences = torch.randint(1, args.vocab, (rows, args.seq), generator=g).tolist()
    return LMDataset(sequences, [0] * rows, pad_id=0)


def rss_mb(field: str) -> float:
    """VmRSS or VmHWM (peak) of this process, from /proc/self/status."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


class StepClock:
    """A reporter that notes the time of every optimizer step."""

    def __init__(self) -> None:
        self.times = [time.perf_counter()]

    def stage(self, name: str, total: int | None = None) -> None:
        self.times = [time.perf_counter()]

    def advance(self, steps: int = 1, **metrics: float) -> None:
        if steps:
            self.times.append(time.perf_counter())

    def event(self, kind: str, **data: Any) -> None:
        pass

    def end(self) -> None:
        pass

    def cancelled(self) -> bool:
        return False


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """In this (fresh) process: train configuration `args.measure` for `args.steps` steps; its peak memory and
    step times."""
    from distill.config import LossConfig, TrainConfig
    from distill.train import train

    model = student(args)
    data = token_data(args, args.batch * args.steps)
    config = TrainConfig(epochs=1, batch_size=args.batch, lr=1e-4, schedule="constant", warmup=0.0,
                         checkpoint_every=0, **CONFIGS[args.measure])  # fmt: skip
    clock = StepClock()
    Path("/proc/self/clear_refs").write_text("5")  # the peak RSS (VmHWM) back to the current RSS
    before = rss_mb("VmRSS")
    result = train(model, data, config, loss=LossConfig(chunk_size=1024), reporter=clock)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    steps = [b - a for a, b in zip(clock.times, clock.times[1:])]
    return {
        "rss_before_mb": before,
        "peak_rss_mb": peak,
        "training_peak_mb": peak - before,
        "step_seconds": steps,
        "median_step_seconds": statistics.median(steps[1:] or steps),
        "final_loss": result.history[-1]["loss"],
        "attention": str(getattr(model.config, "_attn_implementation", None)),
    }


def optimizer_state_bytes(model: Any, args: argparse.Namespace) -> tuple[int, int]:
    """(bytes of the optimizer's state after one step, trainable parameters) of `model` trained by the loop's
    optimizer on one batch."""
    from distill.config import TrainConfig
    from distill.optim import make_optimizer

    optimizer = make_optimizer([model], TrainConfig(lr=1e-4))
    batch = token_data(args, 1).batch(torch.arange(1))
    model(input_ids=batch["inputs"]["input_ids"][:, :64], labels=batch["inputs"]["input_ids"][:, :64]).loss.backward()
    optimizer.step()
    state = sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values() if t.dim())
    return state, sum(p.numel() for p in model.parameters() if p.requires_grad)


def lora_state(args: argparse.Namespace) -> dict[str, Any]:
    """The optimizer state of full fine-tuning and of a LoRA adapter (peft, r 16, all linear layers)."""
    from peft import LoraConfig, get_peft_model

    full, full_params = optimizer_state_bytes(student(args), args)
    adapted = get_peft_model(student(args), LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0,
                                                        target_modules="all-linear"))  # fmt: skip
    lora, lora_params = optimizer_state_bytes(adapted, args)
    return {"full_bytes": full, "full_trainable": full_params, "lora_bytes": lora, "lora_trainable": lora_params,
            "ratio": lora / full, "lora": {"r": 16, "alpha": 32, "target_modules": "all-linear"}}  # fmt: skip


def child(args: argparse.Namespace, name: str) -> dict[str, Any]:
    command = [sys.executable, __file__, "--measure", name, "--width", str(args.width), "--heads", str(args.heads),
               "--vocab", str(args.vocab), "--seq", str(args.seq), "--batch", str(args.batch),
               "--steps", str(args.steps)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    done = subprocess.run(command, check=True, capture_output=True, text=True, env=env)
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def run_rounds(args: argparse.Namespace) -> dict[str, list[dict[str, Any]]]:
    names = list(CONFIGS)
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
    for r in range(args.rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            runs[name].append(child(args, name))
            print(f"round {r + 1} {name}: {runs[name][-1]['training_peak_mb']:.0f} MB, "
                  f"{runs[name][-1]['median_step_seconds']:.2f} s/step", flush=True)  # fmt: skip
    return runs


def summarise(runs: dict[str, list[dict[str, Any]]], lora: dict[str, Any]) -> dict[str, Any]:
    def median(name: str, key: str) -> float:
        return statistics.median(run[key] for run in runs[name])

    rounds = range(len(runs["fp32"]))
    memory_rounds = [runs["checkpointed"][r]["training_peak_mb"] / runs["fp32"][r]["training_peak_mb"] for r in rounds]
    peak_rounds = [runs["checkpointed"][r]["peak_rss_mb"] / runs["fp32"][r]["peak_rss_mb"] for r in rounds]
    time_rounds = {
        name: [runs[name][r]["median_step_seconds"] / runs["fp32"][r]["median_step_seconds"] for r in rounds]
        for name in CONFIGS
    }
    figures = {
        "checkpointed_over_fp32_training_memory": statistics.median(memory_rounds),
        "checkpointed_over_fp32_process_peak": statistics.median(peak_rounds),
        "lora_over_full_optimizer_state": lora["ratio"],
        "checkpointed_over_fp32_step_time": statistics.median(time_rounds["checkpointed"]),
        "bf16_over_fp32_step_time": statistics.median(time_rounds["bf16"]),
    }
    per_config = {name: {key: median(name, key) for key in ("training_peak_mb", "peak_rss_mb", "rss_before_mb",
                                                            "median_step_seconds", "final_loss")}
                  for name in CONFIGS}  # fmt: skip
    return {"figures": figures, "per_config": per_config, "rounds": {"training_memory": memory_rounds,
            "process_peak": peak_rounds, "step_time_over_fp32": time_rounds}}  # fmt: skip


def report(args: argparse.Namespace, summary: dict[str, Any], lora: dict[str, Any]) -> dict[str, bool]:
    per, figures = summary["per_config"], summary["figures"]
    print(f"\nGPT-2 student: {LAYERS} layers, width {args.width}, {args.heads} heads, vocabulary {args.vocab}, "
          f"sequence {args.seq}, batch {args.batch}; {args.rounds} rounds, 1 thread")  # fmt: skip
    print(f"{'config':<14}{'training MB':>12}{'/ fp32':>8}{'process MB':>12}{'s / step':>10}{'/ fp32':>8}")
    for name in CONFIGS:
        memory = per[name]["training_peak_mb"] / per["fp32"]["training_peak_mb"]
        step = statistics.median(summary["rounds"]["step_time_over_fp32"][name])
        print(f"{name:<14}{per[name]['training_peak_mb']:>12.0f}{memory:>8.2f}{per[name]['peak_rss_mb']:>12.0f}"
              f"{per[name]['median_step_seconds']:>10.2f}{step:>8.2f}")  # fmt: skip
    print(f"\n{'optimizer state':<24}{'trainable':>12}{'bytes':>14}{'/ full':>8}")
    print(f"{'full fine-tuning':<24}{lora['full_trainable']:>12,}{lora['full_bytes']:>14,}{1.0:>8.3f}")
    print(f"{'LoRA r=16 all-linear':<24}{lora['lora_trainable']:>12,}{lora['lora_bytes']:>14,}{lora['ratio']:>8.3f}")
    met = {
        "activation_checkpointing_memory": figures["checkpointed_over_fp32_training_memory"] <= MEMORY_TARGET,
        "lora_optimizer_state": figures["lora_over_full_optimizer_state"] <= LORA_TARGET,
    }
    print(f"\ncheckpointed / fp32 training memory {figures['checkpointed_over_fp32_training_memory']:.3f} "
          f"(target <= {MEMORY_TARGET}); LoRA / full optimizer state {lora['ratio']:.4f} (target <= {LORA_TARGET}); "
          f"bf16 / fp32 step time {figures['bf16_over_fp32_step_time']:.2f}")  # fmt: skip
    print("targets met: " + ", ".join(f"{k} {'yes' if v else 'NO'}" for k, v in met.items()))
    return met


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--width", type=int, default=256, help="the student's hidden size")
    parser.add_argument("--heads", type=int, default=8, help="attention heads")
    parser.add_argument("--vocab", type=int, default=8192, help="vocabulary size")
    parser.add_argument("--seq", type=int, default=1024, help="tokens per sequence")
    parser.add_argument("--batch", type=int, default=2, help="sequences per step")
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps per configuration and round")
    parser.add_argument("--rounds", type=int, default=3, help="rounds (each runs every configuration)")
    parser.add_argument("--measure", choices=sorted(CONFIGS), help=argparse.SUPPRESS)  # child process mode
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.measure:
        print(json.dumps(measure(args)))
        return
    load_at_start = os.getloadavg()[0]
    lora = lora_state(args)
    runs = run_rounds(args)
    summary = summarise(runs, lora)
    met = report(args, summary, lora)
    RESULTS.mkdir(exist_ok=True)
    result = {
        "benchmark": "lm_memory_features",
        "command": " ".join(["python benchmarks/lm_memory_features.py", *sys.argv[1:]]),
        "student": {"family": "gpt2", "layers": LAYERS, "width": args.width, "heads": args.heads, "vocab": args.vocab,
                    "seq": args.seq, "batch": args.batch, "steps": args.steps, "loss": "chunked cross-entropy"},
        "configs": CONFIGS,
        **summary,
        "lora_optimizer_state": lora,
        "runs": runs,
        "targets": {"checkpointed_over_fp32_training_memory_at_most": MEMORY_TARGET,
                    "lora_over_full_optimizer_state_at_most": LORA_TARGET},
        "targets_met": met,
        "machine": {"threads_per_process": 1, "load_average_1min_at_start_and_end": [load_at_start,
                    os.getloadavg()[0]], "python": platform.python_version(), "torch": torch.__version__,
                    "bf16_autocast": "cpu"},
    }  # fmt: skip
    (RESULTS / "lm_memory_features.json").write_text(json.dumps(result, indent=2))
    print(f"wrote {RESULTS / 'lm_memory_features.json'}")


if __name__ == "__main__":
    main()
