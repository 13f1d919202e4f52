"""The reasoning recipe against its acceptance figure: the student trained on verified chain-of-thought traces beats
the same student trained on final answers only, by a clear margin, on held-out problems.

    python benchmarks/reasoning_recipe.py                       # runs `distill run --recipe reasoning` (about 8 min)
    python benchmarks/reasoning_recipe.py --from-run runs/reasoning-...   # a finished run's metrics

Writes benchmarks/results/reasoning.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from distill.recipes.reasoning import ReasoningConfig

RESULTS = Path(__file__).parent / "results"
MARGIN = 0.10  # "a clear margin": ten points of held-out accuracy


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
    traces, answers = models["student-traces"]["accuracy"], models["student-answers"]["accuracy"]
    return {
        "description": metrics["description"],
        "models": rows,
        "traces": {k: metrics["traces"].get(k) for k in ("questions", "traces", "verified", "pass_rate", "tokens")},
        "generation": metrics["generation"],
        "prices_per_million_tokens": metrics["prices"],
        "stage_seconds": metrics["stage_seconds"],
        "checks": {f"traces student - answers student >= {MARGIN:.2f}": traces - answers >= MARGIN},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--from-run", type=Path, help="use this finished run's metrics.json instead of running")
    args = parser.parse_args()
    if args.from_run is not None:
        run_dir = args.from_run
        metrics = json.loads((run_dir / "metrics.json").read_text())
        command = f"distill run --recipe reasoning (run directory {run_dir})"
    else:
        from distill.cli.app import store_dir
        from distill.recipes import RECIPES, run_recipe
        from distill.stages import RunContext

        run_dir = Path("runs") / f"bench-reasoning-{time.strftime('%Y%m%d-%H%M%S')}"
        metrics = run_recipe(RECIPES["reasoning"], ReasoningConfig(), RunContext(run_dir, store=store_dir()))
        command = "python benchmarks/reasoning_recipe.py " + " ".join(sys.argv[1:])
    result = {"benchmark": "reasoning", "command": command, "seconds": metrics["seconds"], **summary(metrics)}
    print(json.dumps(result, indent=2))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "reasoning.json").write_text(json.dumps(result, indent=2))
    print(f"wrote {RESULTS / 'reasoning.json'}")


if __name__ == "__main__":
    main()
