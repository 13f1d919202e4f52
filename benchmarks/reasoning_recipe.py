"""The reasoning recipe against its acceptance figures, on held-out problems: a competent teacher (at least 80 %), a
student on its verified chain-of-thought traces that keeps at least 90 % of the teacher's accuracy with at most a
fifth of its parameters, and the same student trained on final answers only far below it; with what the traces cost
per verified trace and per point of the student's accuracy.

    python benchmarks/reasoning_recipe.py                       # runs `distill run --recipe reasoning`
    python benchmarks/reasoning_recipe.py --from-run runs/reasoning-...   # a finished run's metrics
    python benchmarks/reasoning_recipe.py --seed 1              # other problems, split and initial weights

Writes benchmarks/results/reasoning.json (reasoning-seed<N>.json for another seed).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from distill.recipes.reasoning import ReasoningConfig
from distill.recipes.reasoning_report import cost_of_result

RESULTS = Path(__file__).parent / "results"
MARGIN = 0.10  # "far below": at least ten points of held-out accuracy under the student on traces
TEACHER_AT_LEAST = 0.80
KEPT_AT_LEAST = 0.90
PARAMS_AT_MOST = 0.20


def summary(metrics: dict[str, Any]) -> dict[str, Any]:
    models = metrics["models"]
    rows = {
        name: {
            k: m.get(k)
            for k in ("accuracy", "correct", "problems", "params", "size_bytes", "tokens_per_second", "token_cache")
            if k in m
        }
        for name, m in models.items()
    }
    teacher, student = models["teacher"], models["student-traces"]
    traces, answers = student["accuracy"], models["student-answers"]["accuracy"]
    kept = traces / teacher["accuracy"] if teacher["accuracy"] else 0.0
    params = student["params"] / teacher["params"]
    return {
        "description": metrics["description"],
        "models": rows,
        "traces": {k: metrics["traces"].get(k) for k in ("questions", "traces", "verified", "pass_rate", "tokens")},
        "generation": metrics["generation"],
        "prices_per_million_tokens": metrics["prices"],
        "stage_seconds": metrics["stage_seconds"],
        "student_share_of_teacher": {"accuracy": kept, "params": params},
        "cost": cost_of_result(models, metrics["traces"]),
        "checks": {
            f"teacher accuracy >= {TEACHER_AT_LEAST:.2f}": teacher["accuracy"] >= TEACHER_AT_LEAST,
            f"traces student >= {KEPT_AT_LEAST:.2f} of the teacher's accuracy": kept >= KEPT_AT_LEAST,
            f"traces student params <= {PARAMS_AT_MOST:.2f} of the teacher's": params <= PARAMS_AT_MOST,
            f"traces student - answers student >= {MARGIN:.2f}": traces - answers >= MARGIN,
        },
    }


def print_table(result: dict[str, Any]) -> None:
    print(f"{'model':<20} {'accuracy':>9} {'params':>10}")
    for name, row in result["models"].items():
        print(f"{name:<20} {row['accuracy']:>9.1%} {row['params']:>10,}")
    cost = result["cost"]
    print(f"traces cost ${cost['cost']:.4f}: ${cost['per_verified_trace']:.6f} per verified trace, "
          f"{cost['completion_tokens_per_verified_trace']:.1f} completion tokens per verified trace")  # fmt: skip
    for check, ok in result["checks"].items():
        print(f"{'ok ' if ok else 'NOT'} {check}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--from-run", type=Path, help="use this finished run's metrics.json instead of running")
    parser.add_argument("--seed", type=int, default=0, help="the recipe's seed: its problems, split and models (0)")
    parser.add_argument("--output", type=Path, help="results file (benchmarks/results/reasoning.json; other seeds: "
                        "reasoning-seed<N>.json)")  # fmt: skip
    args = parser.parse_args()
    output = args.output or RESULTS / ("reasoning.json" if args.seed == 0 else f"reasoning-seed{args.seed}.json")
    if args.from_run is not None:
        run_dir = args.from_run
        metrics = json.loads((run_dir / "metrics.json").read_text())
        command = f"distill run --recipe reasoning (run directory {run_dir})"
    else:
        from distill.cli.app import store_dir
        from distill.recipes import RECIPES, run_recipe
        from distill.stages import RunContext

        run_dir = Path("runs") / f"bench-reasoning-{time.strftime('%Y%m%d-%H%M%S')}"
        metrics = run_recipe(
            RECIPES["reasoning"], ReasoningConfig(seed=args.seed), RunContext(run_dir, store=store_dir())
        )
        command = "python benchmarks/reasoning_recipe.py " + " ".join(sys.argv[1:])
    result = {"benchmark": "reasoning", "command": command, "seconds": metrics["seconds"], **summary(metrics)}
    print(json.dumps(result, indent=2))
    print_table(result)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=2))
    print(f"wrote {output}")


if __name__ == "__main__":
    main()
