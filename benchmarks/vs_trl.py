"""distill against TRL's GKDTrainer, side by side: the same models, rows and settings, each training run in a
fresh process with one torch thread, the runs of a round interleaved (their order rotates every round), each
ratio taken within a round (the machine's speed drifts between rounds; a paired ratio cancels the drift).

Models: a GPT-2 teacher of 4 layers, 256 wide, and a student of 2 layers, 128 wide (4 x 256 against 2 x 128:
3.8 M against 0.72 M parameters at vocabulary 2,048, recorded in the JSON), built from their configs with random
weights and saved with a word-level tokenizer of exactly `--vocabs` tokens. Rows: `--prompt` + `--completion` random tokens (256 by default), `--batch` rows a
step, `--steps` steps a run. Loss: JSD beta 0.5 at temperature 1 (`_vs_trl_runs` has the rest of the settings).

Cases (`--cases`):

    live        off-policy, the live teacher in the process: distill (`train-lm` with `teacher:`) / TRL
    cache       off-policy, distill reading the teacher's top-`--top-k` cache (`distill cache build`, run once,
                untimed) / TRL with its live teacher (TRL has no cache: training from one is what distill offers)
    on_policy   lmbda 1: every batch's completions sampled from the student (`--new-tokens` tokens) and scored by
                the live teacher: distill / TRL

Per case and vocabulary: steps per second (distill / TRL; above 1 distill is faster), the peak resident memory of
the whole process up to the end of training (distill / TRL; below 1 distill takes less) and the peak that
training adds to what the process held before it (the same ratio), each the median of the rounds with the
range (min-max) across them, and the relative difference of the first step's loss (the same batch and weights
on both sides: rounding for `live`; the top-k cache's approximation for `cache`; for `on_policy` the samples
differ, so only the order of magnitude agrees). Targets: live >= 1.0x TRL's speed at no more memory, cache
>= 1.5x, on-policy >= 1.5x, at every vocabulary.

    python benchmarks/vs_trl.py [--rounds 3] [--steps 4] [--cases live,cache,on_policy] [--vocabs 2048,32000]
                                [--batch 8] [--prompt 64] [--completion 192] [--new-tokens 32] [--top-k 64]

Needs TRL (`pip install -e '.[bench]'`). Writes benchmarks/results/vs_trl.json (`--out`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "results"
CASES = ("live", "cache", "on_policy")
TARGETS = {"live": 1.0, "cache": 1.5, "on_policy": 1.5}  # distill's steps per second over TRL's, at least
MEMORY_TARGET = {"live": 1.0}  # distill's peak memory over TRL's, at most
# The first-step losses: the same batch and weights; the cache's top-k truncates the teacher; on-policy samples differ
LOSS_NOTE = {"live": "{:.1e}", "cache": "{:.1e} (top-k)", "on_policy": "{:.1e} (other samples)"}
COMPARATOR = {"live": "live", "cache": "live", "on_policy": "on_policy"}  # the TRL run each case is compared with


def arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (fresh processes each)")
    parser.add_argument("--steps", type=int, default=4, help="optimizer steps per run (the first is not timed)")
    parser.add_argument("--cases", default=",".join(CASES), help="comma-separated: " + ", ".join(CASES))
    parser.add_argument("--vocabs", default="2048,32000", help="comma-separated vocabulary sizes")
    parser.add_argument("--batch", type=int, default=8, help="rows per step")
    parser.add_argument("--prompt", type=int, default=64, help="prompt tokens per row")
    parser.add_argument("--completion", type=int, default=192, help="completion tokens per row (scored off-policy)")
    parser.add_argument("--new-tokens", type=int, default=32, help="tokens sampled per row on-policy")
    parser.add_argument("--top-k", type=int, default=64, help="log-probs per token in distill's cache")
    parser.add_argument(
        "--precision",
        choices=("fp32", "bf16"),
        default="fp32",
        help="both sides' compute: fp32, or bf16 autocast (TRL's own default is bf16)",
    )
    parser.add_argument("--out", type=Path, default=RESULTS / "vs_trl.json")
    parser.add_argument("--child", choices=("distill", "trl"), help=argparse.SUPPRESS)
    parser.add_argument("--case", choices=CASES, help=argparse.SUPPRESS)
    parser.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    args.vocabs = [int(v) for v in str(args.vocabs).split(",") if v.strip()]
    unknown = sorted(set(args.cases) - set(CASES))
    if unknown or not args.cases:
        parser.error(f"--cases takes {', '.join(CASES)} (got {', '.join(unknown) or 'none'})")
    if args.steps < 4 or args.rounds < 1 or args.batch < 1 or min(args.vocabs, default=0) < 16:
        parser.error("--steps 4 or more, --rounds and --batch 1 or more, vocabularies of 16 tokens or more")
    return args


def child_main(args: argparse.Namespace) -> None:
    """One run in this fresh process; its figures as the last line of stdout."""
    import torch

    torch.set_num_threads(1)
    sys.path.insert(0, str(Path(__file__).parent))
    from _vs_trl_runs import run_distill, run_trl
    from _vs_trl_setup import paths

    run = run_distill if args.child == "distill" else run_trl
    with tempfile.TemporaryDirectory() as out:
        result = run(args.case, paths(args.folder), args.steps, args.batch, args.new_tokens, args.precision, Path(out))
    print(json.dumps(result))


def child(args: argparse.Namespace, side: str, case: str, folder: Path) -> dict[str, Any]:
    command = [sys.executable, __file__, "--child", side, "--case", case, "--folder", str(folder), "--steps",
               str(args.steps), "--batch", str(args.batch), "--new-tokens", str(args.new_tokens), "--precision",
               args.precision]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(f"{side} {case} failed:\n{done.stderr[-4000:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def prepare(args: argparse.Namespace, root: Path) -> dict[int, Path]:
    """Models, rows and (for `cache`) the teacher's cache for each vocabulary; the folder of each."""
    sys.path.insert(0, str(Path(__file__).parent))
    from _vs_trl_setup import build

    folders = {}
    for vocab in args.vocabs:
        folder = root / f"v{vocab}"
        found = build(folder, vocab, args.steps * args.batch, args.prompt, args.completion, args.batch)
        if "cache" in args.cases:
            started = time.perf_counter()
            command = [sys.executable, "-m", "distill.cli", "cache", "build", "--teacher", str(found["teacher"]),
                       "--data", str(found["data"]), "--top-k", str(args.top_k), "--max-length",
                       str(args.prompt + args.completion), "--out", str(found["cache"])]  # fmt: skip
            env = {**os.environ, "OMP_NUM_THREADS": "1"}
            subprocess.run(command, check=True, capture_output=True, env=env)
            print(f"vocabulary {vocab:,}: cache built in {time.perf_counter() - started:.1f} s", flush=True)
        folders[vocab] = folder
        print(f"vocabulary {vocab:,}: parameters {json.loads(found['shape'].read_text())['parameters']}", flush=True)
    return folders


def plan(args: argparse.Namespace) -> list[tuple[str, str, int]]:
    """The runs of one round: (side, case, vocabulary)."""
    runs = []
    for vocab in args.vocabs:
        runs += [("distill", case, vocab) for case in args.cases]
        runs += [("trl", case, vocab) for case in dict.fromkeys(COMPARATOR[c] for c in args.cases)]
    return runs


def run_rounds(args: argparse.Namespace, folders: dict[int, Path]) -> list[dict[str, Any]]:
    """Every run of every round, the order rotated each round."""
    runs, measured = plan(args), []
    for r in range(args.rounds):
        shift = (r * len(runs)) // args.rounds
        for side, case, vocab in runs[shift:] + runs[:shift]:
            result = child(args, side, case, folders[vocab])
            measured.append({"round": r, "side": side, "case": case, "vocab": vocab, **result})
            print(f"round {r + 1} {side:7s} {case:9s} V={vocab:<6} {result['steps_per_second']:.3f} steps/s, "
                  f"peak {result['peak_rss_mb']:.0f} MB (training {result['training_rss_mb']:.0f} MB), "
                  f"first loss {result['first_loss']:.6g}", flush=True)  # fmt: skip
    return measured


def spread(values: list[float]) -> dict[str, Any]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "rounds": values}


def summarise(args: argparse.Namespace, measured: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (case, vocabulary): the ratios of distill's run to its TRL comparator's, round by round."""

    def run(side: str, case: str, vocab: int, r: int) -> dict[str, Any]:
        return next(m for m in measured if (m["side"], m["case"], m["vocab"], m["round"]) == (side, case, vocab, r))

    rows = []
    for vocab in args.vocabs:
        for case in args.cases:
            pairs = [
                (run("distill", case, vocab, r), run("trl", COMPARATOR[case], vocab, r)) for r in range(args.rounds)
            ]
            speed = spread([d["steps_per_second"] / t["steps_per_second"] for d, t in pairs])
            memory = spread([d["peak_rss_mb"] / t["peak_rss_mb"] for d, t in pairs])
            training = spread([d["training_rss_mb"] / t["training_rss_mb"] for d, t in pairs])
            d0, t0 = pairs[0]
            loss = abs(d0["first_loss"] - t0["first_loss"]) / abs(t0["first_loss"])
            passed = speed["median"] >= TARGETS[case] and (
                case not in MEMORY_TARGET or memory["median"] <= MEMORY_TARGET[case]
            )
            rows.append({"case": case, "vocab": vocab, "speed": speed, "peak_memory": memory,
                         "training_memory": training, "first_loss": {"distill": d0["first_loss"],
                         "trl": t0["first_loss"], "relative_difference": loss},
                         "distill_steps_per_second": statistics.median(d["steps_per_second"] for d, _ in pairs),
                         "trl_steps_per_second": statistics.median(t["steps_per_second"] for _, t in pairs),
                         "distill_peak_mb": statistics.median(d["peak_rss_mb"] for d, _ in pairs),
                         "trl_peak_mb": statistics.median(t["peak_rss_mb"] for _, t in pairs),
                         "speed_target": TARGETS[case], "memory_target": MEMORY_TARGET.get(case),
                         "passed": passed})  # fmt: skip
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    head = ("| case | vocabulary | steps/s distill / TRL (range) | peak memory distill / TRL (range) | "
            "training memory distill / TRL | first-step loss, relative difference | target |")  # fmt: skip
    lines = [head, "| --- | --- | --- | --- | --- | --- | --- |"]
    for row in rows:
        s, m, t = row["speed"], row["peak_memory"], row["training_memory"]
        target = f"≥ {row['speed_target']:.1f}x" + (" at ≤ 1.0x memory" if row["memory_target"] else "")
        lines.append(f"| {row['case']} | {row['vocab']:,} | **{s['median']:.2f}x** ({s['min']:.2f}-{s['max']:.2f}) "
                     f"| {m['median']:.2f}x ({m['min']:.2f}-{m['max']:.2f}) | {t['median']:.2f}x "
                     f"| {LOSS_NOTE[row['case']].format(row['first_loss']['relative_difference'])} | {target} "
                     f"{'met' if row['passed'] else 'NOT met'} |")  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    args = arguments()
    if args.child:
        child_main(args)
        return
    import torch
    import trl

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="vs-trl-") as root:
        folders = prepare(args, Path(root))
        models = {vocab: json.loads((folder / "shape.json").read_text()) for vocab, folder in folders.items()}
        measured = run_rounds(args, folders)
    rows = summarise(args, measured)
    print(table(rows))
    settings = {k: v for k, v in vars(args).items() if k not in ("child", "case", "folder", "out")}
    record = {"benchmark": "vs_trl", "settings": settings, "models": models, "rows": rows, "runs": measured,
              "versions": {"torch": torch.__version__, "trl": trl.__version__, "python": platform.python_version()},
              "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
              "seconds": time.perf_counter() - started}  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
