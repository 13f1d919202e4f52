"""`make demo`'s figure and its noise: the default MNIST-1D recipe at several seeds, each run's teacher, student
alone and distilled student scored on the standard 1,000-signal test split (what `make demo` prints) and on 4,000
freshly generated labelled signals (a generator seed no recipe uses), with the gap closed on each.

    python benchmarks/demo_seeds.py                 # seeds 0, 1, 2
    python benchmarks/demo_seeds.py --seeds 0,1,2,3,4
    PYTHONPATH=../old/src python benchmarks/demo_seeds.py --output benchmarks/results/other.json  # another commit

On 1,000 test signals one signal is 0.1 point of accuracy, and the gap closed divides by the teacher's lead over
the student alone (about 25 points): one signal moves it by about 0.004, and the default seed's figure wanders by a
few hundredths from one change of rounding to the next. The fresh signals show whether a change moved the students
or only the test split's draw. Writes benchmarks/results/demo_seeds.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from distill import evaluate, models
from distill.classify import run_classification
from distill.data import ArrayDataset
from distill.recipes.mnist1d import Mnist1dConfig, _generate, task
from distill.stages import RunContext

RESULTS = Path(__file__).parent / "results"
FRESH_SEED, FRESH_SIZE = 900_001, 4_000  # the transfer sets use generator seeds 10,000 + 1,000 x seed + chunk
NAMES = {"teacher": "teacher-0", "alone": "student-alone", "distilled": "student-distilled"}


@torch.inference_mode()
def scores(folder: Path, data: ArrayDataset) -> dict[str, float]:
    """Accuracy of the run's three models on `data`, and the gap closed."""
    found = {}
    for key, name in NAMES.items():
        model = models.load(folder / "models" / name)[0]
        found[key] = evaluate.accuracy(model(data.inputs), data.labels)
    return found | {"gap_closed": evaluate.gap_closed(found["distilled"], found["alone"], found["teacher"])}


def one_seed(seed: int, fresh: ArrayDataset, store: Path, scratch: Path) -> dict[str, Any]:
    built = task(Mnist1dConfig(seed=seed), store)
    output = scratch / f"seed-{seed}"
    started = time.perf_counter()
    metrics = run_classification(built, RunContext(output))
    seconds = time.perf_counter() - started
    test = scores(output, built.test)
    assert abs(test["gap_closed"] - metrics["gap_closed"]) < 1e-9, "the reloaded models score as the run did"
    return {"seed": seed, "seconds": seconds, "test": test, "fresh": scores(output, fresh)}


def table(rows: list[dict[str, Any]]) -> None:
    print("| seed | test: teacher | alone | distilled | gap closed | fresh: teacher | alone | distilled | gap closed |")
    print("| --- |" + " --- |" * 8)
    for r in rows:
        t, f = r["test"], r["fresh"]
        print(f"| {r['seed']} | {t['teacher']:.1%} | {t['alone']:.1%} | {t['distilled']:.1%} | {t['gap_closed']:.3f} "
              f"| {f['teacher']:.1%} | {f['alone']:.1%} | {f['distilled']:.1%} | {f['gap_closed']:.3f} |")  # fmt: skip
    means = [statistics.mean(r[split]["gap_closed"] for r in rows) for split in ("test", "fresh")]
    print(f"mean gap closed: test {means[0]:.3f}, fresh signals {means[1]:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated recipe seeds (0 is make demo's)")
    parser.add_argument("--output", type=Path, default=RESULTS / "demo_seeds.json", help="where the JSON goes")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    if any(not 0 <= s < 890 for s in seeds):
        sys.exit("error: seeds lie in [0, 890): above, a transfer set would share the fresh signals' generator seed")
    x, y = _generate(FRESH_SIZE, FRESH_SEED)
    fresh = ArrayDataset(torch.from_numpy(x), torch.from_numpy(y))
    with tempfile.TemporaryDirectory(prefix="demo-seeds-") as scratch:
        rows = [one_seed(seed, fresh, Path(scratch) / "store", Path(scratch)) for seed in seeds]
    table(rows)
    recipe = Mnist1dConfig()  # the recipe's defaults as this checkout (or PYTHONPATH) has them
    result = {
        "benchmark": "demo_seeds",
        "command": "python benchmarks/demo_seeds.py " + " ".join(sys.argv[1:]),
        "fresh_signals": {"size": FRESH_SIZE, "generator_seed": FRESH_SEED},
        "learning_rates": {"distilled": recipe.student_train.lr, "alone": recipe.model_dump().get("alone_lr")},
        "runs": rows,
        "mean_gap_closed": {s: statistics.mean(r[s]["gap_closed"] for r in rows) for s in ("test", "fresh")},
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=1))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
