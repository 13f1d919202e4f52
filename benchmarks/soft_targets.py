"""The soft-target recipes against Hinton et al. 2015 and the MNIST-1D authors' figures.

Runs `distill run` for MNIST-1D (one teacher), MNIST-1D with a 5-teacher ensemble and the 8x8 digits, each into
runs/bench-*, and collects teacher / student alone / student distilled accuracy, gap closed, retention, speed-up
and compression into benchmarks/results/soft_targets.json (the README's tables come from that file).

References: Hinton et al. 2015 on MNIST: small net alone 146 errors, distilled 74, teacher 67 (gap closed 0.91).
MNIST-1D (Greydanus 2020): CNN 94 %, MLP 68 % trained on the labeled split.

    python benchmarks/soft_targets.py [--only mnist1d,ensemble,digits]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from distill.recipes import RECIPES, run_recipe
from distill.recipes.digits import DigitsConfig
from distill.recipes.mnist1d import Mnist1dConfig
from distill.stages import RunContext

RESULTS = Path(__file__).parent / "results"
RUNS = {
    "mnist1d": Mnist1dConfig(),
    "ensemble": Mnist1dConfig(teachers=5),
    "digits": DigitsConfig(),
}


def summary(metrics: dict) -> dict:
    teacher, alone, student = metrics["teacher"], metrics["student_alone"], metrics["student_distilled"]
    row = {
        "teacher_members": teacher["members"],
        "teacher_accuracy": teacher["accuracy"],
        "best_member_accuracy": max(teacher["member_accuracy"]),
        "student_alone_accuracy": alone["accuracy"],
        "student_distilled_accuracy": student["accuracy"],
        "gap_closed": metrics["gap_closed"],
        "retention": metrics["retention"],
        "agreement": student["agreement"],
        "ece_teacher": teacher["ece"],
        "ece_alone": alone["ece"],
        "ece_distilled": student["ece"],
        "teacher_params": teacher["params"],
        "student_params": student["params"],
        "compression": metrics["compression"],
        "speedup_latency": metrics["speedup"],
        "speedup_throughput": metrics["throughput_speedup"],
        "seconds": metrics["seconds"],
    }
    if "student_from_single_teacher" in metrics:
        row["student_from_teacher_0_accuracy"] = metrics["student_from_single_teacher"]["accuracy"]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default=",".join(RUNS), help="comma-separated subset of " + ", ".join(RUNS))
    args = parser.parse_args()
    results = {}
    for name in args.only.split(","):
        started = time.perf_counter()
        output = Path("runs") / f"bench-{name}-{time.strftime('%Y%m%d-%H%M%S')}"
        config = RUNS[name]
        store = Path.home() / ".cache" / "distill"
        metrics = run_recipe(RECIPES[config.recipe], config, RunContext(output, store=store))
        results[name] = {**summary(metrics), "run_dir": str(output), "wall_seconds": time.perf_counter() - started}

    header = f"{'run':<10}{'teacher':>9}{'alone':>8}{'distilled':>11}{'gap closed':>12}{'retention':>11}{'speed-up':>10}{'compression':>13}"
    print(header)
    for name, r in results.items():
        print(
            f"{name:<10}{100 * r['teacher_accuracy']:>8.1f}%{100 * r['student_alone_accuracy']:>7.1f}%"
            f"{100 * r['student_distilled_accuracy']:>10.1f}%{r['gap_closed']:>12.2f}{100 * r['retention']:>10.1f}%"
            f"{r['speedup_latency']:>9.1f}x{r['compression']:>12.1f}x"
        )
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / "soft_targets.json"
    previous = json.loads(path.read_text()) if path.exists() else {}
    previous.update(
        {
            "benchmark": "soft_targets",
            "command": "python benchmarks/soft_targets.py " + " ".join(sys.argv[1:]),
            "torch_threads": torch.get_num_threads(),
            "runs": {**previous.get("runs", {}), **results},
        }
    )
    path.write_text(json.dumps(previous, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
