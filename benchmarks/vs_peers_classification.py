"""`distill.distill` against torchdistill's KD loss in a plain loop and a 20-line hand loop (issue 19).

The three train the same student (the recipe's MLP) from the same initial weights, on the same data, taught by the
same teacher (the recipe's CNN, trained once here with the recipe's settings): temperature 4, alpha 0.9 (the soft
targets' weight), batch 256, one torch thread. `distill.distill` runs with its defaults; the two peers use AdamW at
a constant learning rate of 3e-3 (distill's default peak) without clipping, and differ only in their loss:
torchdistill's `KDLoss` (alpha 0.1 on the labels, beta 0.9 on the soft targets, its own names for the same mix) or
five lines of `torch.nn.functional`. For accuracy the hand loop also runs at distill's own default peak rate
(`hand_at_distill_peak`, reported beside the targets, not one of them).

Time: each round runs every method for a few epochs in a fresh process, in rotating order, once with the teacher's
outputs computed before training (distill: `cache_dir`; the peers index a tensor of the teacher's logits) and once
with the teacher run on every batch (live); an epoch's time is the mean of the epochs after the first, and the
ratios are formed within each round (methods timed back to back), then their median and range over rounds are taken.
Accuracy: the student's test accuracy after 5, 10 and 20 epochs, median over seeds, with and without the transfer
set. A peer's learning rate is constant, so one run of the longest budget is evaluated at every budget (exactly what
separate runs would give); distill's schedule depends on the budget, so it runs once per budget.

    python benchmarks/vs_peers_classification.py [--rounds 7] [--seeds 0,1,2] [--budgets 5,10,20] [--tasks mnist1d,digits]

Needs torchdistill (`make bench-setup`, which installs it without its torchvision requirement: only its KD loss
module is imported, and that needs torch alone). Writes benchmarks/results/vs_peers_classification.json.
"""

from __future__ import annotations

import argparse
import inspect
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

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import Tensor, nn  # noqa: E402

import distill  # noqa: E402
from distill import evaluate, models  # noqa: E402
from distill.config import ModelSpec  # noqa: E402
from distill.recipes import digits, mnist1d  # noqa: E402
from distill.train import train  # noqa: E402

RESULTS = Path(__file__).parent / "results"
TEMPERATURE, ALPHA, BATCH, PEER_LR = 4.0, 0.9, 256, 3e-3
METHODS = ("distill", "torchdistill", "hand")
DISTILL_LR = float(inspect.signature(distill.distill).parameters["lr"].default)  # its default peak rate
SCORED = (*METHODS, "hand_at_distill_peak")  # the hand loop also at distill's peak rate, for accuracy


# ----------------------------------------------------------------------------------------------------------------
# The three training loops
# ----------------------------------------------------------------------------------------------------------------


def hand_loop(
    student: nn.Module, teach: Any, x: Tensor, y: Tensor, epochs: int, seed: int, on_epoch: Any, lr: float = PEER_LR
) -> None:
    """The 20-line loop a user writes: AdamW at a constant rate, Hinton's loss in torch.nn.functional."""
    optimizer = torch.optim.AdamW(student.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    t = TEMPERATURE
    for epoch in range(1, epochs + 1):
        student.train()
        for index in torch.randperm(len(x), generator=generator).split(BATCH):
            logits = student(x[index])  # (B, C)
            teacher_logits = teach(index, x)  # (B, C)
            soft = F.kl_div(
                F.log_softmax(logits / t, -1),
                F.log_softmax(teacher_logits / t, -1),
                reduction="batchmean",
                log_target=True,
            )
            hard = F.cross_entropy(logits, y[index])  # the labeled rows' mean (-100: no label)
            loss = ALPHA * t * t * soft + (1 - ALPHA) * hard
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        on_epoch(epoch, student)


def torchdistill_loop(
    student: nn.Module, teach: Any, x: Tensor, y: Tensor, epochs: int, seed: int, on_epoch: Any, lr: float = PEER_LR
) -> None:
    """The same loop with torchdistill's KDLoss (its alpha weighs the labels, its beta the soft targets)."""
    try:
        from torchdistill.losses.mid_level import KDLoss
    except ImportError:
        raise SystemExit("torchdistill is not installed: run `make bench-setup`") from None
    kd = KDLoss("logits", "output", "logits", "output", temperature=TEMPERATURE, alpha=1 - ALPHA, beta=ALPHA)
    optimizer = torch.optim.AdamW(student.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    for epoch in range(1, epochs + 1):
        student.train()
        for index in torch.randperm(len(x), generator=generator).split(BATCH):
            logits = student(x[index])  # (B, C)
            loss = kd({"logits": {"output": logits}}, {"logits": {"output": teach(index, x)}}, y[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        on_epoch(epoch, student)


def _now() -> tuple[float, float]:
    """(wall seconds, this process's CPU seconds): on a shared machine the CPU time is the steadier of the two."""
    return time.perf_counter(), time.process_time()


class EpochClock:
    """A `distill.progress.Reporter` that notes the time at the start of training and at each epoch's end."""

    def __init__(self) -> None:
        self.marks: list[tuple[float, float]] = []

    def stage(self, name: str, total: int | None = None) -> None:
        if name == "distill":
            self.marks = [_now()]

    def advance(self, steps: int = 1, **metrics: float) -> None:
        pass

    def event(self, kind: str, **data: Any) -> None:
        if kind == "epoch":
            self.marks.append(_now())

    def end(self) -> None:
        pass

    def cancelled(self) -> bool:
        return False


# ----------------------------------------------------------------------------------------------------------------
# A worker: one method, one seed, in a fresh process
# ----------------------------------------------------------------------------------------------------------------


def _load(task: str, workdir: Path, transfer: bool) -> dict[str, Any]:
    saved = torch.load(workdir / f"{task}.pt", weights_only=True)
    teacher = models.build(ModelSpec(**json.loads(saved["teacher_spec"])), tuple(saved["x"].shape[1:]), 10)
    teacher.load_state_dict(saved["teacher"])
    teacher.eval()
    x, y = saved["x"], saved["y"]
    all_x = torch.cat([x, saved["transfer"]]) if transfer else x  # (N, ...)
    all_y = torch.cat([y, torch.full((len(saved["transfer"]),), -100)]) if transfer else y  # (N,)
    return saved | {"teacher_model": teacher, "all_x": all_x, "all_y": all_y}


def _student(saved: dict[str, Any], seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return models.build(ModelSpec(**json.loads(saved["student_spec"])), tuple(saved["x"].shape[1:]), 10)


def _teach(saved: dict[str, Any], live: bool) -> Any:
    teacher = saved["teacher_model"]
    if live:
        return lambda index, x: _no_grad(teacher, x[index])
    logits = _no_grad(teacher, saved["all_x"])  # (N, C), computed before training
    return lambda index, x: logits[index]


@torch.no_grad()
def _no_grad(model: nn.Module, x: Tensor) -> Tensor:
    return torch.cat([model(part) for part in x.split(4096)])


def worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Train with one method; return the epoch end times (wall and CPU seconds from the start of training) and the
    test accuracies."""
    torch.set_num_threads(1)
    workdir = Path(spec["workdir"])
    saved = _load(spec["task"], workdir, spec["transfer"])
    budgets, seed, method = spec["budgets"], spec["seed"], spec["method"]
    test_x, test_y = saved["test_x"], saved["test_y"]
    accuracy: dict[str, float] = {}
    if method != "distill":
        marks: list[tuple[float, float]] = []

        def on_epoch(epoch: int, model: nn.Module) -> None:
            marks.append(_now())
            if epoch in budgets:
                accuracy[str(epoch)] = evaluate.accuracy(evaluate.predict(model, test_x), test_y)
                model.train()

        loop = torchdistill_loop if method == "torchdistill" else hand_loop
        options = {"lr": DISTILL_LR} if method == "hand_at_distill_peak" else {}
        teach, student = _teach(saved, spec["live"]), _student(saved, seed)
        marks.append(_now())
        loop(student, teach, saved["all_x"], saved["all_y"], max(budgets), seed, on_epoch, **options)
        return {"epoch_ends": _since_start(marks), "accuracy": accuracy}
    cache = None if spec["live"] else workdir / f"cache-{spec['task']}-{int(spec['transfer'])}"
    for budget in budgets:
        clock, started = EpochClock(), time.perf_counter()
        result = distill.distill(
            saved["teacher_model"], _student(saved, seed), (saved["x"], saved["y"]),
            transfer=saved["transfer"] if spec["transfer"] else None, temperature=TEMPERATURE, alpha=ALPHA,
            epochs=budget, batch_size=BATCH, seed=seed, cache_dir=cache, reporter=clock,
        )  # fmt: skip
        accuracy[str(budget)] = evaluate.accuracy(evaluate.predict(result.model, test_x), test_y)
    return {"epoch_ends": _since_start(clock.marks), "accuracy": accuracy, "setup_seconds": clock.marks[0][0] - started}


def _since_start(marks: list[tuple[float, float]]) -> dict[str, list[float]]:
    return {
        "wall": [m[0] - marks[0][0] for m in marks[1:]],
        "cpu": [m[1] - marks[0][1] for m in marks[1:]],
    }


def _in_fresh_process(spec: dict[str, Any]) -> dict[str, Any]:
    command = [sys.executable, __file__, "--worker", json.dumps(spec)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"worker {spec} failed:\n{done.stderr[-3000:]}")
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


# ----------------------------------------------------------------------------------------------------------------
# The run: prepare, time, score, report
# ----------------------------------------------------------------------------------------------------------------


def prepare(task_name: str, workdir: Path, teacher_epochs: int | None) -> dict[str, Any]:
    """The recipe's task and teacher (trained with the recipe's settings), saved for the workers; the teacher's
    cached outputs built by `distill.distill` itself (one epoch of a throw-away student)."""
    if task_name == "mnist1d":
        task = mnist1d.task(mnist1d.Mnist1dConfig(), Path.home() / ".cache" / "distill")
    else:
        task = digits.task(digits.DigitsConfig())
    assert task.transfer is not None
    torch.manual_seed(0)
    teacher = models.build(task.teacher, task.train.input_shape, task.num_classes)
    started = time.perf_counter()
    settings = task.teacher_train.model_copy(update={"epochs": teacher_epochs} if teacher_epochs else {})
    train(teacher, task.teacher_data if task.teacher_data is not None else task.train, settings)
    seconds = time.perf_counter() - started
    teacher.eval()
    saved = {
        "teacher": teacher.state_dict(), "teacher_spec": task.teacher.model_dump_json(),
        "student_spec": task.student.model_dump_json(), "x": task.train.inputs, "y": task.train.labels,
        "transfer": task.transfer.inputs, "test_x": task.test.inputs, "test_y": task.test.labels,
    }  # fmt: skip
    torch.save(saved, workdir / f"{task_name}.pt")
    for transfer in (False, True):
        torch.manual_seed(0)
        distill.distill(
            teacher, models.build(task.student, task.train.input_shape, 10), (task.train.inputs, task.train.labels),
            transfer=task.transfer.inputs if transfer else None, temperature=TEMPERATURE, alpha=ALPHA, epochs=1,
            cache_dir=workdir / f"cache-{task_name}-{int(transfer)}",
        )  # fmt: skip
    return {
        "teacher_accuracy": evaluate.accuracy(evaluate.predict(teacher, task.test.inputs), task.test.labels),
        "teacher_train_seconds": seconds,
        "labeled_rows": len(task.train),
        "transfer_rows": len(task.transfer),
        "test_rows": len(task.test),
        "teacher": task.teacher.model_dump(),
        "student": task.student.model_dump(),
    }


def _epoch_seconds(ends: list[float]) -> float:
    """The mean time of the epochs after the first (the first also warms allocators and caches up)."""
    return (ends[-1] - ends[0]) / (len(ends) - 1)


def time_methods(workdir: Path, rounds: int, epochs: int) -> dict[str, Any]:
    """Per mode (cached, live) and clock (wall, cpu): every method's epoch time in each round (fresh processes,
    rotating order), and the ratios to the hand loop formed within rounds."""
    out: dict[str, Any] = {}
    for live in (False, True):
        mode = "live" if live else "cached"
        seconds: dict[str, dict[str, list[float]]] = {c: {m: [] for m in METHODS} for c in ("wall", "cpu")}
        for r in range(rounds):
            for method in METHODS[r % 3 :] + METHODS[: r % 3]:
                spec = {"task": "mnist1d", "workdir": str(workdir), "method": method, "live": live, "transfer": True,
                        "seed": 0, "budgets": [epochs]}  # fmt: skip
                ends = _in_fresh_process(spec)["epoch_ends"]
                for clock in seconds:
                    seconds[clock][method].append(_epoch_seconds(ends[clock]))
            cells = ", ".join(
                f"{m} {seconds['wall'][m][-1]:.3f} s ({seconds['cpu'][m][-1]:.3f} s CPU)" for m in METHODS
            )
            print(f"  {mode} round {r + 1}: {cells}")
        out[mode] = {clock: _ratios(per) for clock, per in seconds.items()}
    return out


def _ratios(seconds: dict[str, list[float]]) -> dict[str, Any]:
    ratios = {f"{m}/hand": [a / b for a, b in zip(seconds[m], seconds["hand"])] for m in ("distill", "torchdistill")}
    return {
        "seconds_per_epoch": seconds,
        "median_seconds_per_epoch": {m: statistics.median(v) for m, v in seconds.items()},
        "ratio_rounds": ratios,
        "ratio_median": {k: statistics.median(v) for k, v in ratios.items()},
        "ratio_range": {k: [min(v), max(v)] for k, v in ratios.items()},
    }


def score_methods(workdir: Path, tasks: list[str], seeds: list[int], budgets: list[int]) -> dict[str, Any]:
    """Test accuracy per task, data (labeled alone or with the transfer set), method, budget and seed."""
    out: dict[str, Any] = {}
    for task in tasks:
        for transfer in (False, True):
            key = f"{task}/{'transfer' if transfer else 'labeled'}"
            runs: dict[str, dict[str, list[float]]] = {m: {str(b): [] for b in budgets} for m in SCORED}
            for seed in seeds:
                for method in SCORED:
                    spec = {"task": task, "workdir": str(workdir), "method": method, "live": False,
                            "transfer": transfer, "seed": seed, "budgets": budgets}  # fmt: skip
                    for budget, value in _in_fresh_process(spec)["accuracy"].items():
                        runs[method][budget].append(value)
            medians = {m: {b: statistics.median(v) for b, v in per.items()} for m, per in runs.items()}
            out[key] = {"per_seed": runs, "median": medians}
            print(
                f"  {key}: "
                + "; ".join(f"{m} " + " ".join(f"{100 * v:.1f}" for v in medians[m].values()) for m in SCORED)
            )
    return out


def _print_tables(timing: dict[str, Any], scores: dict[str, Any], budgets: list[int]) -> None:
    print("\n| teacher outputs | clock | distill s/epoch | torchdistill s/epoch | hand s/epoch | distill / hand "
          "| torchdistill / hand |")  # fmt: skip
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for mode, clocks in timing.items():
        for clock, t in clocks.items():
            s, m, rng = t["median_seconds_per_epoch"], t["ratio_median"], t["ratio_range"]
            cells = [f"{m[k]:.3f} [{rng[k][0]:.2f}-{rng[k][1]:.2f}]" for k in ("distill/hand", "torchdistill/hand")]
            times = " | ".join(f"{s[name]:.3f}" for name in METHODS)
            print(f"| {mode} | {clock} | {times} | {cells[0]} | {cells[1]} |")
    head = " | ".join(f"{b} epochs: distill / torchdistill / hand / hand at {DISTILL_LR:g}" for b in budgets)
    print(f"\n| task | data | {head} |")
    print("| --- | --- |" + " --- |" * len(budgets))
    for key, s in scores.items():
        task, data = key.split("/")
        cells = [" / ".join(f"{100 * s['median'][m][str(b)]:.1f}" for m in SCORED) for b in budgets]
        print(f"| {task} | {data} | " + " | ".join(cells) + " |")


def _acceptance(timing: dict[str, Any], scores: dict[str, Any], budgets: list[int]) -> dict[str, Any]:
    """The issue's targets, checked on the figures just measured."""
    accurate = {
        f"{key}/{b}": s["median"]["distill"][str(b)] >= s["median"]["hand"][str(b)]
        for key, s in scores.items()
        for b in budgets
    }
    return {
        "epoch_ratio_at_most_1.02": {
            f"{mode}/{clock}": t["ratio_median"]["distill/hand"] <= 1.02
            for mode, clocks in timing.items()
            for clock, t in clocks.items()
        },
        "distill_at_least_hand_accuracy": accurate,
        "not_a_target:distill_at_least_hand_at_distill_peak": {
            f"{key}/{b}": s["median"]["distill"][str(b)] >= s["median"]["hand_at_distill_peak"][str(b)]
            for key, s in scores.items()
            for b in budgets
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=7, help="timing rounds (each method once per round)")
    parser.add_argument("--time-epochs", type=int, default=3, help="epochs per timed run (the first is not counted)")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--budgets", default="5,10,20")
    parser.add_argument("--tasks", default="mnist1d,digits")
    parser.add_argument("--teacher-epochs", type=int, help="instead of the recipe's (a quick trial of the script)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    seeds, budgets = [int(s) for s in args.seeds.split(",")], [int(b) for b in args.budgets.split(",")]
    tasks = args.tasks.split(",")
    try:  # checked before the long work
        import torchdistill.losses.mid_level  # noqa: F401
    except ImportError:
        raise SystemExit("torchdistill is not installed: run `make bench-setup`") from None
    started = time.perf_counter()
    workdir = Path(tempfile.mkdtemp(prefix="vs-peers-"))
    prepared = {}
    for task in sorted(set(tasks) | {"mnist1d"}):
        prepared[task] = prepare(task, workdir, args.teacher_epochs)
        print(
            f"{task}: teacher {100 * prepared[task]['teacher_accuracy']:.1f} % ({prepared[task]['teacher_train_seconds']:.0f} s)"
        )
    print("timing (mnist1d with its transfer set, fresh processes):")
    timing = time_methods(workdir, args.rounds, args.time_epochs)
    print("accuracy (median over seeds; distill / torchdistill / hand):")
    scores = score_methods(workdir, tasks, seeds, budgets)
    _print_tables(timing, scores, budgets)
    result = {
        "benchmark": "vs_peers_classification",
        "command": "python benchmarks/vs_peers_classification.py " + " ".join(sys.argv[1:]),
        "settings": {
            "temperature": TEMPERATURE,
            "alpha": ALPHA,
            "batch_size": BATCH,
            "peer_lr": PEER_LR,
            "distill_lr": DISTILL_LR,
            "seeds": seeds,
            "budgets": budgets,
            "rounds": args.rounds,
            "time_epochs": args.time_epochs,
            "teacher_epochs": args.teacher_epochs,
        },
        "tasks": prepared,
        "timing": timing,
        "accuracy": scores,
        "acceptance": _acceptance(timing, scores, budgets),
        "seconds": time.perf_counter() - started,
        "machine": {
            "cpu_threads": torch.get_num_threads(),
            "python": platform.python_version(),
            "torch": torch.__version__,
        },
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "vs_peers_classification.json").write_text(json.dumps(result, indent=2))
    print(f"wrote {RESULTS / 'vs_peers_classification.json'}")


if __name__ == "__main__":
    main()
