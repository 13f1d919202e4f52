"""Cross-tokenizer distillation against its acceptance figures: `distill run --recipe lm --student-tokenizer other`
(a byte-level BPE teacher of 4,096 tokens, students with a SentencePiece-style unigram of 1,024), then a distillation
step through alignment timed side by side with a same-tokenizer step.

    python benchmarks/cross_tokenizer.py                  # the recipe (about 25 min on 2 cores), then the step timing
    python benchmarks/cross_tokenizer.py --from-run DIR   # a finished run's metrics, then the step timing

Checks: on held-out bits per byte, the aligned student beats sequence-level KD and ULD and recovers at least 60 %
of the same-tokenizer student's gain over its alone twin; an aligned step costs at most 1.3x a same-tokenizer step.
The step timing: the same student (unigram 1,024) and the same batches, one step reading a top-k cache of its own
tokenizer (built from the run's alone student, as a same-tokenizer teacher would give it), the other reading the
teacher's cache through alignment (`CrossTokenizerTeacher`), interleaved rounds in one process.

Writes benchmarks/results/cross_tokenizer.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

RESULTS = Path(os.environ.get("DISTILL_BENCH_RESULTS", Path(__file__).parent / "results"))
SETTINGS = {"sample_size": 21_000, "student_sample_size": 5_000, "vocab_size": 4096, "student_vocab_size": 1024,
            "top_k": 64, "teacher_train.epochs": 3, "student_train.epochs": 3, "tasks": 0}  # fmt: skip
RECOVERY, STEP_RATIO = 0.60, 1.3


def run_recipe(run_dir: Path, threads: int) -> None:
    command = [sys.executable, "-m", "distill.cli", "run", "--recipe", "lm", "--student-tokenizer", "other",
               "--output", str(run_dir), *(f"--set={k}={v}" for k, v in SETTINGS.items())]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    subprocess.run(command, check=True, env=env)


def step_timing(run_dir: Path, rows: int, rounds: int) -> dict[str, Any]:
    """Median seconds per distillation step, same-tokenizer cache vs the teacher's cache through alignment."""
    import torch
    from transformers import GPT2LMHeadModel, PreTrainedTokenizerFast

    from distill import config as cfg
    from distill.cli.app import default_data_dir
    from distill.lm import lm_terms
    from distill.lm_data import Example, LMDataset, tokenize_examples
    from distill.lm_models import gpt2
    from distill.losses import weighted_total
    from distill.recipes.lm import LMConfig, corpus
    from distill.teachers.cross import CrossTokenizerTeacher
    from distill.teachers.token_cache import TokenCache, build_token_cache, causal_lm_logits

    config = cfg.load(LMConfig, run_dir / "config.yaml") if (run_dir / "config.yaml").is_file() else None
    config = config or LMConfig(**_nested(SETTINGS), student_tokenizer="other")
    texts = corpus(config, config.data_dir or default_data_dir())
    train_texts = texts[max(200, len(texts) // 20) :]  # as the recipe splits them
    tokenizers = {side: PreTrainedTokenizerFast.from_pretrained(run_dir / folder)
                  for side, folder in (("teacher", "tokenizer"), ("student", "student-tokenizer"))}  # fmt: skip
    examples = [Example("", t) for t in train_texts]
    teacher_data = tokenize_examples(tokenizers["teacher"], examples, config.max_length)
    full = tokenize_examples(tokenizers["student"], examples[:rows], config.max_length)
    data = LMDataset(full.sequences, full.prompt_lengths.tolist(), full.pad_id)
    own = Path(tempfile.mkdtemp()) / "cache"
    alone = GPT2LMHeadModel.from_pretrained(run_dir / "models" / "student-alone").eval()
    build_token_cache(causal_lm_logits(alone), [s.numpy() for s in data.sequences], own,
                      scored=[data.scored(i).numpy() for i in range(len(data))], top_k=config.top_k,
                      temperature=config.loss.temperature, teacher_name="student-alone", teacher_revision="bench",
                      tokenizer_hash="student", vocab_size=len(tokenizers["student"]), data_id=data.fingerprint(),
                      batch_size=32)  # fmt: skip
    teachers = {
        "same tokenizer": TokenCache(own),
        "aligned": CrossTokenizerTeacher(TokenCache(run_dir / "cache"), tokenizers["teacher"], tokenizers["student"],
                                         teacher_data=teacher_data, max_length=config.max_length,
                                         top_k=config.top_k),
    }  # fmt: skip
    batches = [data.batch(index) for index in torch.arange(len(data)).split(config.student_train.batch_size)]
    times: dict[str, list[float]] = {name: [] for name in teachers}
    for round_ in range(rounds + 1):  # the first round warms up
        for name in teachers if round_ % 2 == 0 else reversed(list(teachers)):
            student = gpt2(tokenizers["student"], config.student, config.max_length, seed=1)
            optimizer = torch.optim.AdamW(student.parameters(), lr=config.student_train.lr)
            start = time.perf_counter()
            for batch in batches:
                terms, weights = lm_terms(student, batch, teachers[name], config.loss)
                weighted_total(terms, weights).backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            if round_:
                times[name].append((time.perf_counter() - start) / len(batches))
    median = {name: statistics.median(values) for name, values in times.items()}
    return {"rows": rows, "batch_size": config.student_train.batch_size, "rounds": rounds,
            "step_seconds": median, "all_step_seconds": times,
            "ratio": median["aligned"] / median["same tokenizer"],
            "ratio_range": [a / s for a, s in zip(times["aligned"], times["same tokenizer"])]}  # fmt: skip


def _run_settings(run_dir: Path) -> dict[str, Any]:
    """The run's sizes as its config.yaml gives them (a run made with other settings than SETTINGS)."""
    import yaml

    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    keys = ("sample_size", "student_sample_size", "vocab_size", "student_vocab_size", "top_k", "tasks")
    return {k: config.get(k) for k in keys} | {
        "teacher_train.epochs": config["teacher_train"]["epochs"],
        "student_train.epochs": config["student_train"]["epochs"],
    }


def _nested(flat: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in flat.items():
        *parents, last = key.split(".")
        node = out
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    return out


def summary(metrics: dict[str, Any], steps: dict[str, Any]) -> dict[str, Any]:
    models = {name: {k: m[k] for k in ("tokenizer", "bits_per_byte", "perplexity", "params", "step_seconds",
                                       "train_seconds")} for name, m in metrics["models"].items()}  # fmt: skip
    from distill.recipes.lm_cross import recovery as recovered

    bpb = {name: m["bits_per_byte"] for name, m in models.items()}
    metrics.setdefault("recovery_prefix", recovered(metrics["models"], "student-aligned-prefix"))  # older runs
    checks = {}
    for name, key, label in (("student-aligned", "recovery", "aligned (exact map)"),
                             ("student-aligned-prefix", "recovery_prefix", "aligned (prefix map)")):  # fmt: skip
        recovery = metrics[key]
        checks |= {
            f"{label} < sequence-level KD (bits per byte)": bpb[name] < bpb["student-seq-kd"],
            f"{label} < ULD (bits per byte)": bpb[name] < bpb["student-uld"],
            f"{label} recovers >= {RECOVERY:.0%} of the same-tokenizer gain": recovery is not None
            and recovery >= RECOVERY,
        }
    checks[f"aligned step <= {STEP_RATIO}x a same-tokenizer step"] = steps["ratio"] <= STEP_RATIO
    return {
        "description": metrics["description"],
        "models": models,
        "alignment": metrics["alignment"],
        "recovery": metrics["recovery"],
        "recovery_prefix": metrics["recovery_prefix"],
        "step_timing": steps,
        "checks": checks,
    }


def print_table(result: dict[str, Any]) -> None:
    print(f"{'model':<26} {'tokenizer':<14} {'bits/byte':>10} {'s/step':>8}")
    for name, m in result["models"].items():
        print(f"{name:<26} {m['tokenizer']:<14} {m['bits_per_byte']:>10.4f} {m['step_seconds']:>8.3f}")
    steps = result["step_timing"]
    print(f"aligned coverage {result['alignment']['coverage']:.1%}; recovery {result['recovery'] or float('nan'):.1%} (exact map), "
          f"{result['recovery_prefix'] or float('nan'):.1%} (prefix map); aligned step "
          f"{steps['ratio']:.2f}x a same-tokenizer step (rounds {min(steps['ratio_range']):.2f}-"
          f"{max(steps['ratio_range']):.2f})")  # fmt: skip
    for check, held in result["checks"].items():
        print(f"  [{'ok' if held else 'FAILED'}] {check}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--from-run", type=Path, help="a finished run of the recipe variant instead of a new one")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (one process)")
    parser.add_argument("--rows", type=int, default=256, help="training rows the step timing goes through")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds (after one warm-up)")
    parser.add_argument("--out", default="cross_tokenizer.json", help="the results file's name under results/")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    run_dir = args.from_run or Path("runs") / f"bench-cross-tokenizer-{time.strftime('%Y%m%d-%H%M%S')}"
    if args.from_run is None:
        run_recipe(run_dir, args.threads)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    result = {
        "benchmark": "cross_tokenizer",
        "command": "python benchmarks/cross_tokenizer.py " + " ".join(sys.argv[1:]),
        "settings": _run_settings(run_dir),
        "threads": args.threads,
        "recipe_seconds": metrics["seconds"],
        **summary(metrics, step_timing(run_dir, args.rows, args.rounds)),
        "seconds": time.perf_counter() - started,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / args.out).write_text(json.dumps(result, indent=2))
    print_table(result)
    print(f"wrote {RESULTS / args.out}")


if __name__ == "__main__":
    main()
