"""How `make demo`'s learning rates were chosen: the MNIST-1D recipe's student trained alone and distilled at several
learning rates, every other setting the recipe's, scored on 4,000 freshly generated labelled *validation* signals
(generator seed 900,002: neither the test split, nor demo_seeds.py's fresh signals, nor any transfer set).

    python benchmarks/mnist1d_lr.py                       # seeds 0-5, about 15 minutes on 2 CPU cores
    python benchmarks/mnist1d_lr.py --seeds 0,1 --distilled 0.005,0.03 --alone 0.005,0.01

Each seed trains its teacher once and labels its transfer set once; each variant is the pipeline's own training
call (`distill.classify._fit`), from the pipeline's initial weights. The student alone trains in batches of 32 over
the 4,000 labelled signals, the distilled one in batches of 512 over 44,000, so they need not share a learning rate.
Writes benchmarks/results/mnist1d_lr.json; the recipe's defaults are the rates with the best mean here.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from distill import evaluate
from distill.classify import _alone_train, _fit, _soft_targets, _teachers
from distill.data import ArrayDataset, concat
from distill.recipes.mnist1d import Mnist1dConfig, _generate, task
from distill.stages import RunContext

RESULTS = Path(__file__).parent / "results"
VALIDATION_SEED, VALIDATION_SIZE = 900_002, 4_000


def rates(text: str) -> list[float]:
    values = [float(v) for v in text.split(",")]
    if any(not 0 < v < 10 for v in values):
        sys.exit(f"error: learning rates lie in (0, 10): {text}")
    return values


@torch.inference_mode()
def accuracy(model: torch.nn.Module, data: ArrayDataset) -> float:
    return evaluate.accuracy(model(data.inputs), data.labels)


def one_seed(seed: int, lrs: dict[str, list[float]], validation: ArrayDataset, scratch: Path) -> list[dict[str, Any]]:
    """Every variant of one recipe seed, on the validation signals."""
    built = task(Mnist1dConfig(seed=seed), scratch / "store")
    run = RunContext(scratch / f"seed-{seed}")
    data = concat(built.train, built.transfer.unlabeled())
    members = _teachers(built, run)
    soft = _soft_targets(built, members, data, run)
    teacher_accuracy = accuracy(members[0].model, validation)
    rows = [{"seed": seed, "model": "teacher", "lr": built.teacher_train.lr, "accuracy": teacher_accuracy}]
    for model, values in lrs.items():
        for lr in values:
            if model == "alone":
                config, rows_in, teacher = _alone_train(built, data).model_copy(update={"lr": lr}), built.train, None
            else:
                config, rows_in = built.student_train.model_copy(update={"seed": seed, "lr": lr}), data
                teacher = soft.cache.at_temperature(built.loss.temperature)
            name = f"{model}-{lr:g}"
            trained = _fit(name, built.student, built, rows_in, config, run, teacher=teacher, init_seed=seed + 7)
            rows.append({"seed": seed, "model": model, "lr": lr, "accuracy": accuracy(trained.model, validation)})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def summary(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean and worst validation accuracy of each (model, learning rate) over the seeds."""
    keys = sorted({(r["model"], r["lr"]) for r in rows})
    found = []
    for model, lr in keys:
        values = [r["accuracy"] for r in rows if r["model"] == model and r["lr"] == lr]
        mean, worst = statistics.mean(values), min(values)
        found.append({"model": model, "lr": lr, "mean": mean, "min": worst, "seeds": len(values)})
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="0,1,2,3,4,5", help="comma-separated recipe seeds")
    parser.add_argument("--distilled", default="0.005,0.01,0.02,0.03,0.04,0.06,0.08", help="the distilled student's")
    parser.add_argument("--alone", default="0.0025,0.005,0.01,0.02", help="the student alone's learning rates")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    if any(not 0 <= s < 890 for s in seeds):
        sys.exit("error: seeds lie in [0, 890): above, a transfer set would share the validation signals' seed")
    torch.set_num_threads(2)
    x, y = _generate(VALIDATION_SIZE, VALIDATION_SEED)
    validation = ArrayDataset(torch.from_numpy(x), torch.from_numpy(y))
    lrs = {"alone": rates(args.alone), "distilled": rates(args.distilled)}
    with tempfile.TemporaryDirectory(prefix="mnist1d-lr-") as scratch:
        rows = [row for seed in seeds for row in one_seed(seed, lrs, validation, Path(scratch))]
    found = summary(rows)
    print("| model | learning rate | mean validation accuracy | worst seed |")
    print("| --- | --- | --- | --- |")
    for s in found:
        print(f"| {s['model']} | {s['lr']:g} | {s['mean']:.2%} | {s['min']:.2%} |")
    defaults = Mnist1dConfig()
    result = {
        "benchmark": "mnist1d_lr",
        "command": "python benchmarks/mnist1d_lr.py " + " ".join(sys.argv[1:]),
        "validation_signals": {"size": VALIDATION_SIZE, "generator_seed": VALIDATION_SEED},
        "recipe_defaults": {"distilled": defaults.student_train.lr, "alone": defaults.alone_lr},
        "summary": found,
        "runs": rows,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "mnist1d_lr.json").write_text(json.dumps(result, indent=1))
    print(f"wrote {RESULTS / 'mnist1d_lr.json'}")


if __name__ == "__main__":
    main()
