"""The reasoning recipe's report: teacher vs students on held-out problems, the traces and their cost, and the
calculations the models write (rendered by `distill.report`)."""

from __future__ import annotations

from typing import Any

from distill import plots
from distill.eval_lm import summary as eval_summary
from distill.generate.solve import OPERATIONS
from distill.report import Report, Table, count, learning_curves, num, pct, ratio, seconds, size, task_table

OPS = list(OPERATIONS)


def _money(value: float | None) -> str:
    """Dollars to four decimals, or to three significant digits below a cent (a trace costs a few millionths)."""
    if value is None:
        return "–"
    return f"${value:.4f}" if value == 0 or abs(value) >= 0.01 else f"${value:.3g}"


def _kept(student: float, teacher: float) -> str:
    return pct(student / teacher) if teacher > 0 else "–"


def _token_kd_summary(models: dict[str, Any]) -> list[str]:
    """The sentence on the student taught the API's top log-probs too, when the run has one."""
    with_kd = models.get("student-traces-kd")
    if with_kd is None:
        return []
    on_traces, cache = models["student-traces"], with_kd.get("token_cache") or {}
    diff = with_kd["accuracy"] - on_traces["accuracy"]
    return [
        f"Taught also the teacher's top {cache.get('top_k', 1) - 1} log-probs at each trace token (sparse token-level "
        f"KD from the API's answers, {pct(cache.get('coverage', 0))} of the trace tokens covered), the same student "
        f"solves **{pct(with_kd['accuracy'])}** ({'+' if diff >= 0 else ''}{100 * diff:.1f} points against the "
        "traces alone)."
    ]


def cost_of_result(models: dict[str, Any], traces: dict[str, Any]) -> dict[str, float | None]:
    """What the traces cost per verified trace, per point of the traces student's held-out accuracy, and per point
    it gained over the answers-only student (None where the divisor is zero or the cost is unknown)."""
    cost, verified = traces.get("cost"), traces.get("verified") or 0
    student, answers = models["student-traces"]["accuracy"], models["student-answers"]["accuracy"]

    def per(divisor: float) -> float | None:
        return cost / divisor if cost is not None and divisor > 0 else None

    return {
        "cost": cost,
        "per_verified_trace": per(verified),
        "per_accuracy_point": per(100 * student),
        "per_point_over_answers_only": per(100 * (student - answers)),
        "completion_tokens_per_verified_trace": traces["tokens"]["completion"] / verified if verified else None,
    }


def _models_table(models: dict[str, Any]) -> Table:
    trained_on = {
        "teacher": "worked solutions",
        "student-traces": "verified teacher traces",
        "student-answers": "final answers only",
        "student-traces-kd": "verified traces + the API's top log-probs",
    }
    header = [
        "model",
        "trained on",
        "held-out accuracy",
        "parameters",
        "size",
        "tokens/s (batch 16)",
        "training rows",
        "optimizer steps",
        "train time",
    ]
    rows = [
        [
            name,
            trained_on.get(name, "–"),
            f"{pct(m['accuracy'])} ({m['correct']}/{m['problems']})",
            count(m["params"]),
            size(m.get("size_bytes")),
            count(round(m["tokens_per_second"])),
            count(m.get("train_rows")),
            count(m.get("train_steps")),
            seconds(m.get("train_seconds")),
        ]
        for name, m in models.items()
    ]
    return Table("Teacher vs students (held-out problems)", header, rows)


def _traces_table(traces: dict[str, Any], spent: dict[str, float | None]) -> Table:
    tokens = traces["tokens"]
    trace_header = ["questions", "traces", "per question", "verified", "pass rate", "questions solved", "kept",
                    "rejected (wrong / no answer)", "prompt tokens (per trace)", "completion tokens", "cost",
                    "per verified trace", "per point of accuracy"]  # fmt: skip
    trace_rows = [
        [
            count(traces["questions"]),
            count(traces["traces"]),
            num(traces["traces_per_question"], 1),
            count(traces["verified"]),
            pct(traces["pass_rate"]),
            pct(traces["solved_rate"]),
            count(traces["kept"]),
            f"{count(traces['rejected_wrong_answer'])} / {count(traces['rejected_no_answer'])}",
            count(tokens["prompt"]),
            count(tokens["completion"]),
            _money(traces.get("cost")),
            _money(spent["per_verified_trace"]),
            _money(spent["per_accuracy_point"]),
        ]
    ]
    return Table("Traces", trace_header, trace_rows)


def _arithmetic(models: dict[str, Any]) -> list[list[str]]:
    """Per model, the share of its calculations 'a op b = c' that are right, per operation."""
    arithmetic = [
        [name]
        + [
            f"{pct(c['right'] / c['written'])} of {count(c['written'])}" if c["written"] else "–"
            for c in (m.get("calculations", {}).get(op, {"written": 0}) for op in OPS)
        ]
        for name, m in models.items()
    ]
    return arithmetic


def _summary(models: dict[str, Any], traces: dict[str, Any], arithmetic: list[list[str]]) -> list[str]:
    spent = cost_of_result(models, traces)
    teacher, on_traces, on_answers = models["teacher"], models["student-traces"], models["student-answers"]
    diff = on_traces["accuracy"] - on_answers["accuracy"]
    summary = [
        f"The student trained on the teacher's verified reasoning traces solves **{pct(on_traces['accuracy'])}** of "
        f"the held-out problems, the same student trained on final answers only **{pct(on_answers['accuracy'])}** "
        f"({'+' if diff >= 0 else ''}{100 * diff:.1f} points); the teacher solves {pct(teacher['accuracy'])}, so the "
        f"student keeps {_kept(on_traces['accuracy'], teacher['accuracy'])} of the teacher's accuracy.",
        f"The student has {ratio(teacher['params'] / on_traces['params'])} fewer parameters than the teacher and "
        f"processes {ratio(on_traces['tokens_per_second'] / teacher['tokens_per_second'])} as many tokens per second.",
        "The teacher's calculations in its held-out answers are right for "
        + ", ".join(f"{cell} '{op}'" for op, cell in zip(OPS, arithmetic[list(models).index("teacher")][1:]))
        + "; only traces whose final answer verifies reach the student.",
        *_token_kd_summary(models),
        f"The teacher, served over the OpenAI-compatible API, wrote {count(traces['traces'])} traces for "
        f"{count(traces['questions'])} questions; {pct(traces['pass_rate'])} had the right final answer "
        f"({count(traces['kept'])} kept for training), at a cost of {_money(traces.get('cost'))} at the nominal prices: "
        f"{_money(spent['per_verified_trace'])} per verified trace, {_money(spent['per_accuracy_point'])} per point of "
        f"the student's accuracy ({_money(spent['per_point_over_answers_only'])} per point it gained over answers "
        "only).",
    ]
    return summary


def _notes(metrics: dict[str, Any]) -> list[str]:
    models, generation, prices = metrics["models"], metrics["generation"], metrics["prices"]
    on_traces, on_answers = models["student-traces"], models["student-answers"]
    baseline = (
        "the gold final answers of every traced question"
        if metrics.get("baseline") == "all"
        else "the gold final answers of the questions with a verified trace"
    )
    sampling = metrics["sampling"]
    notes = [
        "Accuracy: greedy decoding, the final answer (the last '#### x') compared with the gold answer; the "
        "held-out questions appear in no model's training data.",
        f"The answers-only student learns {baseline} (completion '#### x'), from the same initialisation as the "
        f"student on traces and for at least as many optimizer steps ({count(on_answers.get('train_steps'))} vs "
        f"{count(on_traces.get('train_steps'))}).",
        f"Traces: temperature {sampling['temperature']}, top_p {sampling['top_p']}, at most {sampling['max_tokens']} "
        f"tokens, through {count(generation.get('requests'))} requests to the teacher's own server "
        f"({count(generation.get('written'))} written now, {count(generation.get('skipped'))} reused from an earlier "
        f"run, {count(generation.get('failed'))} failed, {count(generation.get('retries'))} retries).",
        f"Prompt tokens are counted with each trace; a request for n traces sends its prompt once, so the requests "
        f"of this run were billed {count(generation.get('prompt_tokens'))} prompt and "
        f"{count(generation.get('completion_tokens'))} completion tokens ({_money(generation.get('cost'))}).",
        f"Cost at nominal prices of ${prices['input_per_million']} / ${prices['output_per_million']} per million "
        "prompt / completion tokens (a hosted model's order of magnitude); the local teacher itself costs only CPU "
        "time.",
        "Tokens per second: forward passes over held-out question + solution batches, the three models timed side "
        "by side.",
        "Stages: "
        + ", ".join(f"{name} {seconds(value)}" for name, value in metrics.get("stage_seconds", {}).items())
        + f"; whole run {seconds(metrics.get('seconds'))}.",
    ]
    return notes


def report(metrics: dict[str, Any]) -> Report:
    """The reasoning report: accuracy, traces, cost, calculations, and how each was measured."""
    models, traces = metrics["models"], metrics["traces"]
    arithmetic = _arithmetic(models)
    histories = {name: m["history"] for name, m in models.items()}
    return Report(
        title="distill report: reasoning",
        description=metrics["description"],
        summary=_summary(models, traces, arithmetic) + (eval_summary(metrics["tasks"]) if metrics.get("tasks") else []),
        tables=[
            _models_table(models),
            _traces_table(traces, cost_of_result(models, traces)),
            Table("Calculations 'a op b = c' in the held-out answers that are right", ["model", *OPS], arithmetic),
            *([task_table(metrics["tasks"])] if metrics.get("tasks") else []),
        ],
        notes=_notes(metrics),
        images={
            **learning_curves(histories, "loss"),
            "accuracy_vs_params.png": plots.accuracy_vs_size(
                [{"name": n, "params": m["params"], "accuracy": m["accuracy"]} for n, m in models.items()],
                ylabel="held-out accuracy (%)",
            ),
        },
    )
