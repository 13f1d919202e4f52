"""The transformer recipes against their acceptance figures (DistilBERT-style students of all-MiniLM-L6-v2).

    python benchmarks/transformer_recipes.py --recipe stsb        # runs `distill run --recipe stsb` (about 12 min)
    python benchmarks/transformer_recipes.py --recipe sst2        # runs `distill run --recipe sst2` (about 15 min)
    python benchmarks/transformer_recipes.py --recipe stsb --from-run runs/stsb-...   # a finished run's metrics

Targets: STS-B, the 3-layer student keeps >= 97 % of the teacher's Spearman with >= 1.7x CPU encoding throughput;
SST-2, the 2-layer derived student keeps >= 97 % of the teacher's accuracy and beats itself trained alone, and the
BiLSTM distilled beats itself alone by >= 2 points. Writes benchmarks/results/<recipe>.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

from distill.recipes.sst2 import Sst2Config
from distill.recipes.stsb import StsbConfig

RESULTS = Path(__file__).parent / "results"
DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def stsb_summary(metrics: dict[str, Any]) -> dict[str, Any]:
    students = {s["name"]: s for s in metrics["students"]}
    three = students["3-layer"]
    rows = {
        name: {k: s.get(k) for k in ("layers", "init", "spearman", "retention", "params", "throughput", "speedup")}
        for name, s in students.items()
    }
    return {
        "teacher_spearman": metrics["teacher"]["spearman"],
        "teacher_throughput": metrics["teacher"]["throughput"],
        "students": rows,
        "checks": {
            "3-layer retention >= 0.97": three["retention"] >= 0.97,
            "3-layer throughput speed-up >= 1.7": three["speedup"] >= 1.7,
        },
    }


def sst2_summary(metrics: dict[str, Any]) -> dict[str, Any]:
    s = metrics["students"]
    rows = {
        name: {k: v.get(k) for k in ("layers", "accuracy", "retention", "params", "speedup", "latency_speedup")}
        for name, v in s.items()
    }
    checks = {
        "transformer distilled retention >= 0.97": s["transformer-distilled"]["retention"] >= 0.97,
        "transformer distilled beats alone": s["transformer-distilled"]["accuracy"]
        > s["transformer-alone"]["accuracy"],
    }
    if "bilstm-distilled" in s:
        checks["bilstm distilled - alone >= 2 points"] = (
            s["bilstm-distilled"]["accuracy"] - s["bilstm-alone"]["accuracy"] >= 0.02
        )
    return {"teacher_accuracy": metrics["teacher"]["accuracy"], "students": rows, "checks": checks}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", choices=["stsb", "sst2"], required=True)
    parser.add_argument("--from-run", type=Path, help="use this finished run's metrics.json instead of running")
    parser.add_argument("--data-dir", type=Path, default=DATA)
    args = parser.parse_args()
    if args.from_run is not None:
        run_dir = args.from_run
        metrics = json.loads((run_dir / "metrics.json").read_text())
        command = f"distill run --recipe {args.recipe} (run directory {run_dir})"
    else:
        from distill.cli.app import store_dir
        from distill.recipes import RECIPES, run_recipe
        from distill.stages import RunContext

        config = StsbConfig() if args.recipe == "stsb" else Sst2Config()
        run_dir = Path("runs") / f"bench-{args.recipe}-{time.strftime('%Y%m%d-%H%M%S')}"
        context = RunContext(run_dir, store=store_dir(), datasets=args.data_dir)
        metrics = run_recipe(RECIPES[args.recipe], config, context)
        command = "python benchmarks/transformer_recipes.py " + " ".join(sys.argv[1:])
    summary = stsb_summary(metrics) if args.recipe == "stsb" else sst2_summary(metrics)
    result = {
        "benchmark": args.recipe,
        "command": command,
        "run_dir": str(run_dir),
        "seconds": metrics["seconds"],
        "torch_threads": torch.get_num_threads(),
        **summary,
    }
    print(json.dumps(result, indent=2))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.recipe}.json").write_text(json.dumps(result, indent=2))
    print(f"wrote {RESULTS / (args.recipe + '.json')}")


if __name__ == "__main__":
    main()
