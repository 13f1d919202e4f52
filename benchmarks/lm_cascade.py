"""An LM cascade on the reasoning recipe's models: how much of the teacher's accuracy the student keeps when the
requests it is least confident about go to the teacher, and at what share of requests.

    python benchmarks/lm_cascade.py --run runs/reasoning-...     # a finished `distill run --recipe reasoning`

The run's held-out problems (its config.yaml regenerates them) are the test set; the validation set is `--validation`
fresh problems from the recipe's generator (another seed), none sharing a question with the run's training or
held-out problems (with `--validation 0`, the held-out problems are split at random (`--seed`) into a validation and
a test half, as the script did first: 150 validation problems placed the threshold coarsely). The teacher (models/teacher) and the student (models/student-traces, `--student`) answer every problem
greedily, with batched generation; the student's confidence in each answer is measured as `distill serve
--teacher-url` measures it (`distill.lm_confidence`: the mean token log-prob; with the verifier, that an answer ends
with a well-formed "#### N" line; the agreement of k sampled answers). On the validation half, each measure's
threshold is chosen as the cascade chooses it (`distill.serve.calibrate.judge` against the gold answers: the lowest
threshold whose accuracy reaches `--target` of the teacher's, judged by a lower confidence bound at level
`--assurance`, as `distill serve` judges it by default); on the test half the cascade is scored with that
threshold. Prints the test curve of accuracy against the share of requests sent to the teacher and a table per
measure; writes benchmarks/results/lm_cascade.json. Acceptance (the `--measure` chosen in advance, logprob+verify
by default): on the test half, at least 98 % of the teacher's accuracy with at most 40 % of requests escalated.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import yaml

from distill import cascade_curve
from distill.engine import Engine
from distill.generate.problems import make_problems
from distill.hf import load_causal_lm, load_tokenizer
from distill.lm_confidence import ConfidenceConfig, same_answer
from distill.recipes.reasoning import ReasoningConfig, problem_sets, prompt_of
from distill.serve.calibrate import Answered, generate, judge, row_confidence

RESULTS = Path(__file__).parent / "results"
MIN_RELATIVE, MAX_ESCALATED = 0.98, 0.40
CURVE_STEPS = 11  # rows of the printed curve: escalated shares 0 %, 10 %, ..., 100 %


def measures(samples: int, temperature: float) -> dict[str, ConfidenceConfig]:
    """The confidence measures compared, by name."""
    final = {"answers": "final", "samples": samples, "sample_temperature": temperature}
    return {
        "logprob": ConfidenceConfig(measure="logprob", **final),
        "logprob+verify": ConfidenceConfig(measure="logprob", verify=True, **final),
        "agreement": ConfidenceConfig(measure="agreement", **final),
        "agreement+verify": ConfidenceConfig(measure="agreement", verify=True, **final),
    }


def models_dir(run: Path) -> Path:
    for candidate in (run / "models", run / "output" / "models"):
        if (candidate / "teacher").is_dir():
            return candidate
    sys.exit(f"error: {run} holds no models/teacher: give a finished `distill run --recipe reasoning` directory")


def run_problems(run: Path) -> tuple[ReasoningConfig, list[Any], list[Any]]:
    """The run's config, training problems and held-out problems."""
    path = run / "config.yaml" if (run / "config.yaml").is_file() else run / "output" / "config.yaml"
    if not path.is_file():
        sys.exit(f"error: {run} has no config.yaml (the run did not finish)")
    config = ReasoningConfig.model_validate(yaml.safe_load(path.read_text()))
    training, held = problem_sets(config)
    return config, training, held


def fresh_problems(config: ReasoningConfig, count: int, seen: list[Any]) -> list[Any]:
    """`count` problems of the recipe's generator (another seed) whose questions none of `seen` has."""
    taken = {" ".join(p.question.lower().split()) for p in seen}
    found: list[Any] = []
    draw = 2 * count
    while len(found) < count:
        drawn = make_problems(draw, seed=config.seed + 7_919, steps=config.steps)
        found = [p for p in drawn if " ".join(p.question.lower().split()) not in taken][:count]
        draw *= 2
    return found


def scored(
    engine: Engine, problems: list[Any], max_tokens: int, config: ConfidenceConfig | None, batch_size: int
) -> tuple[list[Any], float]:
    """`calibrate.generate`'s rows for `problems` and the seconds they took."""
    started = time.perf_counter()
    prompts = [engine.encode(prompt_of(problem)) for problem in problems]
    rows = generate(engine, prompts, config, max_tokens, batch_size)
    return rows, time.perf_counter() - started


def halves(validation: int, held: int, seed: int) -> tuple[list[int], list[int]]:
    """(validation rows, test rows): the fresh validation problems and the held-out ones after them; without fresh
    ones, the held-out problems split at random in halves."""
    if validation:
        return list(range(validation)), list(range(validation, validation + held))
    order = list(range(held))
    random.Random(seed).shuffle(order)
    return sorted(order[: held // 2]), sorted(order[held // 2 :])


def on_test(confidence: torch.Tensor, student_ok: torch.Tensor, teacher_ok: torch.Tensor, threshold: float) -> dict:
    """The cascade with `threshold` on the test rows: its accuracy, as a share of the teacher's, and escalations."""
    kept = confidence >= threshold  # (N,)
    accuracy = float(torch.where(kept, student_ok, teacher_ok).double().mean())
    teacher = float(teacher_ok.double().mean())
    return {"accuracy": accuracy, "relative": accuracy / teacher if teacher else 1.0,
            "escalated": 1 - float(kept.double().mean())}  # fmt: skip


def evaluate_measure(
    name: str, config: ConfidenceConfig, data: dict[str, Any], target: float, assurance: float
) -> dict[str, Any]:
    """One measure: threshold on the validation half, the cascade on the test half, and the test curve."""
    student, teacher, gold, halves = data["student"], data["teacher"], data["gold"], data["halves"]
    found = [Answered(row.text, row_confidence(config, row, samples)) for row, samples in student]
    val, test = halves
    chosen = judge([found[i] for i in val], [teacher[i] for i in val], [gold[i] for i in val], config, target,
                   assurance)  # fmt: skip
    confidence = torch.tensor([found[i].confidence for i in test], dtype=torch.float64)  # (N,)
    student_ok = torch.tensor([same_answer(found[i].text, gold[i], "final") for i in test])  # (N,)
    teacher_ok = torch.tensor([same_answer(teacher[i], gold[i], "final") for i in test])  # (N,)
    tested = on_test(confidence, student_ok, teacher_ok, chosen.choice.threshold)
    test_curve = cascade_curve.curve(confidence, student_ok, teacher_ok)
    return {
        "measure": name,
        "confidence": config.model_dump(),
        "validation": asdict(chosen.choice),
        "test": tested,
        "test_curve": [asdict(p) for p in test_curve],
        "validation_curve": [asdict(p) for p in chosen.curve],
        "passed": tested["relative"] >= MIN_RELATIVE and tested["escalated"] <= MAX_ESCALATED,
    }


def at_share(points: list[dict[str, Any]], share: float) -> str:
    """The curve's point that escalates the most rows within `share`, as "accuracy (share of the teacher's)"; a
    dash where no threshold escalates so few (the verifier's refusals always go to the teacher)."""
    fitting = [p for p in points if p["escalated"] <= share + 1e-9]
    if not fitting:
        return "–"
    point = max(fitting, key=lambda p: p["escalated"])
    return f"{point['score']:.1%} ({point['relative']:.1%})"


def print_tables(result: dict[str, Any]) -> None:
    rows = result["measures"]
    print(f"\n{result['description']}\n")
    print("Test half: cascade accuracy (share of the teacher's) with at most this share of requests escalated")
    print("| escalated at most | " + " | ".join(r["measure"] for r in rows) + " |")
    print("| --- |" + " --- |" * len(rows))
    for step in range(CURVE_STEPS):
        share = step / (CURVE_STEPS - 1)
        print(f"| {share:.0%} | " + " | ".join(at_share(r["test_curve"], share) for r in rows) + " |")
    print("\nThreshold chosen on the validation half, scored on the test half")
    print("| measure | threshold | val escalated | val share of teacher | test accuracy | test share of teacher "
          "| test escalated | met |")  # fmt: skip
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        v, t = r["validation"], r["test"]
        print(
            f"| {r['measure']} | {v['threshold']:.4g} | {v['escalation_rate']:.1%} | {v['relative']:.1%} "
            f"| {t['accuracy']:.1%} | {t['relative']:.1%} | {t['escalated']:.1%} | {'yes' if r['passed'] else 'no'} |"
        )
    print(
        f"\nteacher {result['accuracy']['teacher']:.1%}, student {result['accuracy']['student']:.1%} on the test half"
    )


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, required=True, help="a finished distill run --recipe reasoning")
    parser.add_argument("--student", default="student-traces", help="the student under models/ (student-traces)")
    parser.add_argument("--target", type=float, default=0.99, help="share of the teacher's accuracy to keep (val)")
    parser.add_argument("--assurance", type=float, default=cascade_curve.ASSURANCE,
                        help="level of the lower bound that must reach --target (0.5: the point estimate)")  # fmt: skip
    parser.add_argument("--measure", default="logprob+verify", help="the measure the acceptance is judged on")
    parser.add_argument("--samples", type=int, default=5, help="answers sampled per prompt for agreement")
    parser.add_argument("--sample-temperature", type=float, default=0.7)
    parser.add_argument("--validation", type=int, default=1000,
                        help="fresh validation problems (0: split the held-out problems in halves)")  # fmt: skip
    parser.add_argument("--seed", type=int, default=0, help="the validation/test split with --validation 0")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output", type=Path, default=RESULTS / "lm_cascade.json")
    return parser.parse_args()


def main() -> None:
    args = parse()
    torch.set_num_threads(args.threads)
    folder = models_dir(args.run)
    config, training, held = run_problems(args.run)
    if args.validation < 0:
        sys.exit("error: --validation must be 0 or more")
    if not 0 < args.assurance < 1:
        sys.exit("error: --assurance must lie strictly between 0 and 1")
    validation = fresh_problems(config, args.validation, training + held) if args.validation else []
    problems = validation + held
    table = measures(args.samples, args.sample_temperature)
    if args.measure not in table:
        sys.exit(f"error: --measure must be one of {', '.join(table)}")
    tokenizer = load_tokenizer(folder / "teacher")
    teacher = Engine(load_causal_lm(folder / "teacher"), tokenizer)
    student = Engine(load_causal_lm(folder / args.student), tokenizer)
    longest = max(len(teacher.encode(prompt_of(p))) for p in problems)
    max_tokens = min(config.max_new_tokens, teacher.context - longest, student.context - longest)
    teacher_rows, teacher_seconds = scored(teacher, problems, max_tokens, None, args.batch_size)
    student_rows, student_seconds = scored(student, problems, max_tokens, table["agreement"], args.batch_size)
    data = {"student": student_rows, "teacher": [row.text for row, _ in teacher_rows],
            "gold": [p.answer for p in problems], "halves": halves(len(validation), len(held), args.seed)}  # fmt: skip
    results = [evaluate_measure(name, cfg, data, args.target, args.assurance) for name, cfg in table.items()]
    test = data["halves"][1]
    accuracy = {
        name: sum(same_answer(text, data["gold"][i], "final") for i, text in enumerate(texts) if i in test) / len(test)
        for name, texts in (("teacher", data["teacher"]), ("student", [row.text for row, _ in student_rows]))
    }
    primary = next(r for r in results if r["measure"] == args.measure)
    result = {
        "benchmark": "lm_cascade",
        "command": "python benchmarks/lm_cascade.py " + " ".join(sys.argv[1:]),
        "description": (f"reasoning run {args.run}: {len(data['halves'][0])} validation problems "
                        f"({'fresh' if validation else 'half of the held-out ones'}) / {len(test)} held-out test "
                        f"problems; teacher vs {args.student}; greedy answers of at most "
                        f"{max_tokens} tokens; threshold for {args.target:.0%} of the teacher's validation accuracy "
                        f"at {args.assurance:.0%} confidence"),
        "accuracy": accuracy,
        "seconds": {"teacher_answers": teacher_seconds, "student_answers_and_samples": student_seconds},
        "acceptance": {"measure": args.measure, "min_relative": MIN_RELATIVE, "max_escalated": MAX_ESCALATED,
                       "relative": primary["test"]["relative"], "escalated": primary["test"]["escalated"],
                       "passed": primary["passed"]},
        "measures": results,
    }  # fmt: skip
    print_tables(result)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=1))
    print(f"acceptance ({args.measure}): {'met' if primary['passed'] else 'NOT met'}; wrote {args.output}")


if __name__ == "__main__":
    main()
