"""What does distillation cost per epoch, next to training the same student plainly?

Measured side by side in one run, on the MNIST-1D recipe's data (labeled + transfer rows), teacher and student:

    cached ratio = (distillation epoch reading cached teacher outputs) / (plain student epoch)        target <= 1.10
    live ratio   = (distillation epoch with the live teacher) / (plain epoch + teacher forward alone) target <= 1.05

Each round times every variant once, in rotating order; the figures are medians over rounds. The plain epoch uses
the same rows with labels everywhere (the transfer rows' generator labels), so both loops do the same number of
steps of the same model. Writes benchmarks/results/kd_overhead.json.

    python benchmarks/kd_overhead.py [--rounds 21] [--transfer-size 40000]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from distill import models
from distill.data import ArrayDataset, concat, epoch_order
from distill.recipes import mnist1d
from distill.recipes.mnist1d import Mnist1dConfig
from distill.teachers import LocalTeacher, build_cache
from distill.train import train

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=21)
    parser.add_argument("--transfer-size", type=int, default=40_000)
    parser.add_argument("--teacher-epochs", type=int, default=3, help="a few epochs: the timing needs no good teacher")
    args = parser.parse_args()

    config = Mnist1dConfig(transfer_size=args.transfer_size)
    task = mnist1d.task(config, Path.home() / ".cache" / "distill")
    transfer_inputs = task.transfer.inputs if task.transfer is not None else torch.zeros(0, 40)
    kd_data = concat(task.train, ArrayDataset(transfer_inputs, torch.full((len(transfer_inputs),), -100)))
    # For the plain epoch every row gets a label (the teacher's prediction stands in for the discarded one).
    shape = task.train.input_shape
    torch.manual_seed(0)
    teacher_model = models.build(task.teacher, shape, 10)
    train(teacher_model, task.train, task.teacher_train.model_copy(update={"epochs": args.teacher_epochs}))
    live = LocalTeacher(teacher_model, 10)
    with torch.no_grad():
        labels = torch.cat(
            [live({"inputs": kd_data.inputs[i : i + 4096]}).logprobs.argmax(-1) for i in range(0, len(kd_data), 4096)]
        )
    plain_data = ArrayDataset(kd_data.inputs, labels)
    workdir = Path(tempfile.mkdtemp())
    loss = task.loss
    cache = build_cache(live, kd_data, workdir / "cache", teacher_id="bench", data_id=kd_data.fingerprint())
    cached = cache.at_temperature(loss.temperature)  # as the recipes use it
    epoch = task.student_train.model_copy(update={"epochs": 1, "checkpoint_every": 0})

    def student() -> torch.nn.Module:
        torch.manual_seed(1)
        return models.build(task.student, shape, 10)

    def plain() -> float:
        return train(student(), plain_data, epoch).seconds

    def kd_cached() -> float:
        return train(student(), kd_data, epoch, teacher=cached, loss=loss).seconds

    def kd_live() -> float:
        return train(student(), kd_data, epoch, teacher=live, loss=loss).seconds

    @torch.no_grad()
    def teacher_forward() -> float:
        start = time.perf_counter()
        for index in epoch_order(len(kd_data), epoch.batch_size, epoch.seed, 0):
            live(kd_data.batch(index))
        return time.perf_counter() - start

    variants = {"plain": plain, "kd_cached": kd_cached, "kd_live": kd_live, "teacher_forward": teacher_forward}
    for fn in variants.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {name: [] for name in variants}
    names = list(variants)
    for r in range(args.rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            times[name].append(variants[name]())
    median = {name: statistics.median(values) for name, values in times.items()}
    # Ratios are formed within each round (variants timed back to back), then the median over rounds is taken:
    # this machine's speed drifts between rounds, and a paired ratio cancels the drift.
    cached_rounds = [c / p for c, p in zip(times["kd_cached"], times["plain"])]
    live_rounds = [k / (p + t) for k, p, t in zip(times["kd_live"], times["plain"], times["teacher_forward"])]
    cached_ratio = statistics.median(cached_rounds)
    live_ratio = statistics.median(live_rounds)

    print(f"{'variant':<18}{'median s/epoch':>16}{'all rounds':>40}")
    for name in names:
        print(f"{name:<18}{median[name]:>16.3f}   {', '.join(f'{t:.3f}' for t in times[name])}")
    print(
        f"\ncached KD / plain                         = {cached_ratio:.3f}  (target <= 1.10)"
        f"  rounds: {', '.join(f'{r:.3f}' for r in cached_rounds)}"
    )
    print(
        f"live KD / (plain + teacher forward alone) = {live_ratio:.3f}  (target <= 1.05)"
        f"  rounds: {', '.join(f'{r:.3f}' for r in live_rounds)}"
    )

    RESULTS.mkdir(exist_ok=True)
    result = {
        "benchmark": "kd_overhead",
        "command": "python benchmarks/kd_overhead.py " + " ".join(sys.argv[1:]),
        "rows": len(kd_data),
        "batch_size": epoch.batch_size,
        "rounds": args.rounds,
        "seconds_per_epoch": median,
        "all_rounds": times,
        "cached_over_plain": cached_ratio,
        "cached_over_plain_rounds": cached_rounds,
        "live_over_plain_plus_teacher_rounds": live_rounds,
        "live_over_plain_plus_teacher": live_ratio,
        "targets": {"cached_over_plain": 1.10, "live_over_plain_plus_teacher": 1.05},
        "machine": {
            "cpu_threads": torch.get_num_threads(),
            "python": platform.python_version(),
            "torch": torch.__version__,
        },
    }
    (RESULTS / "kd_overhead.json").write_text(json.dumps(result, indent=2))
    print(f"wrote {RESULTS / 'kd_overhead.json'}")


if __name__ == "__main__":
    main()
