"""Reports of the transformer, language-model and reasoning recipes (STS-B, SST-2, LM, reasoning), built on
`distill.report`, and `REPORTS`: which builder renders which recipe's metrics."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from distill import plots
from distill.report import Report, Table, classification_report, count, num, pct, ratio, seconds, size


def _history_plot(histories: dict[str, list[dict[str, float]]], metric: str) -> dict[str, bytes]:
    usable = {name: h for name, h in histories.items() if h}
    return {"learning_curves.png": plots.learning_curves(usable, metric)} if usable else {}


def stsb_report(metrics: dict[str, Any]) -> Report:
    teacher, students = metrics["teacher"], metrics["students"]
    rows = [
        [
            "teacher",
            f"all {teacher['layers']}",
            "pretrained",
            num(teacher["spearman"], 4),
            "100.0 %",
            count(teacher["params"]),
            "1.0x",
            count(round(teacher["throughput"])),
            num(teacher["latency_ms"], 1),
        ]
    ]
    for s in students:
        rows.append(
            [
                s["name"],
                ", ".join(map(str, s["layers"])),
                s["init"],
                num(s["spearman"], 4),
                pct(s["retention"]),
                count(s["params"]),
                ratio(s["compression"]),
                count(round(s["throughput"])) if s.get("throughput") else "–",
                num(s.get("latency_ms"), 1) if s.get("latency_ms") else "–",
            ]
        )
    header = [
        "model",
        "teacher layers kept",
        "init",
        "STS-B Spearman",
        "retention",
        "parameters",
        "compression",
        "sentences/s (batch 128)",
        "latency ms (batch 1)",
    ]
    main = [s for s in students if s["main"]]
    summary = [
        f"The {s['name']} student keeps **{pct(s['retention'])}** of the teacher's Spearman "
        f"({num(s['spearman'], 4)} vs {num(teacher['spearman'], 4)}) and encodes **{ratio(s.get('speedup'))}** as many "
        "sentences per second on this CPU."
        for s in main
    ]
    three = [s for s in students if len(s["layers"]) == 3 and s["init"] == "teacher"]
    if len(three) > 1:
        best = max(three, key=lambda s: s["spearman"])
        worst = min(three, key=lambda s: s["spearman"])
        summary.append(
            f"Which layers a 3-layer student keeps matters: layers {', '.join(map(str, best['layers']))} reach "
            f"{pct(best['retention'])} retention, layers {', '.join(map(str, worst['layers']))} "
            f"{pct(worst['retention'])}, from the same teacher with the same training."
        )
    for s in students:
        if s["init"] == "random":
            summary.append(
                f"Without the teacher's weights (random initialisation, same training) a {len(s['layers'])}-layer "
                f"student reaches {pct(s['retention'])}: the DistilBERT initialisation does much of the work."
            )
    notes = [
        "Loss per student: cosine distance between student and teacher sentence embeddings (weight "
        f"{metrics.get('embedding_weight', 1.0)}) plus, per student layer i, MSE to teacher layer (i + 1) L / n - 1 "
        f"(weight {metrics.get('hidden_weight', 1.0)}); terms per epoch are in metrics.json.",
        "Speed: teacher and students timed side by side on the same STS-B sentences (interleaved rounds, median).",
        f"Whole run: {seconds(metrics.get('seconds'))}.",
    ]
    return Report(
        title="distill report: stsb",
        description=metrics["description"],
        summary=summary,
        tables=[Table("Teacher vs students (STS-B test)", header, rows)],
        notes=notes,
        images={
            **_history_plot({s["name"]: s["history"] for s in students}, "loss"),
            "accuracy_vs_params.png": plots.accuracy_vs_size(
                [{"name": "teacher", "params": teacher["params"], "accuracy": teacher["spearman"]}]
                + [{"name": s["name"], "params": s["params"], "accuracy": s["spearman"]} for s in students],
                ylabel="STS-B Spearman x 100",
            ),
        },
    )


def sst2_report(metrics: dict[str, Any]) -> Report:
    teacher, students = metrics["teacher"], metrics["students"]
    rows = [
        [
            "teacher (fine-tuned)",
            "all",
            pct(teacher["accuracy"]),
            "100.0 %",
            "–",
            count(teacher["params"]),
            "1.0x",
            num(teacher["latency_ms"], 1),
            count(round(teacher["throughput"])),
            pct(teacher["ece"]),
        ]
    ]
    for name, s in students.items():
        rows.append(
            [
                name,
                ", ".join(map(str, s.get("layers", []))) or "–",
                pct(s["accuracy"]),
                pct(s["retention"]),
                pct(s["agreement"]),
                count(s["params"]),
                ratio(teacher["params"] / s["params"]),
                num(s.get("latency_ms"), 1) if s.get("latency_ms") else "–",
                count(round(s["throughput"])) if s.get("throughput") else "–",
                pct(s["ece"]),
            ]
        )
    header = [
        "model",
        "teacher layers kept",
        "test accuracy",
        "retention",
        "agreement",
        "parameters",
        "compression",
        "latency ms (batch 1)",
        "sentences/s (batch 128)",
        "ECE",
    ]
    summary = []
    for kind in ("transformer", "bilstm"):
        distilled, alone = students.get(f"{kind}-distilled"), students.get(f"{kind}-alone")
        if distilled and alone:
            diff = distilled["accuracy"] - alone["accuracy"]
            summary.append(
                f"{kind}: distilled **{pct(distilled['accuracy'])}** ({pct(distilled['retention'])} of the teacher) "
                f"against {pct(alone['accuracy'])} trained alone ({'+' if diff >= 0 else ''}{100 * diff:.1f} points), "
                f"{ratio(distilled.get('latency_speedup'))} lower latency, {ratio(distilled.get('speedup'))} throughput."
            )
    ablation = students.get("transformer-ablation-distilled")
    if ablation and "transformer-distilled" in students:
        main = students["transformer-distilled"]
        summary.append(
            f"Kept layers matter: layers {', '.join(map(str, main['layers']))} give {pct(main['accuracy'])}, layers "
            f"{', '.join(map(str, ablation['layers']))} {pct(ablation['accuracy'])} (same data, same training)."
        )
    loss = metrics["loss"]
    notes = [
        f"Loss of the distilled students: {loss['alpha']} * T^2 * {loss['divergence']}(teacher_T || student_T) + "
        f"{1 - loss['alpha']:.2f} * CE(labels) on labeled rows, T = {loss['temperature']}; the transfer set has no labels.",
        "The transformer students start from the pretrained teacher's layers (never the fine-tuned ones); the "
        "distilled and alone runs of a student start from the same weights.",
        "Speed: teacher and students timed side by side on the same test sentences (interleaved rounds, median).",
        f"Whole run: {seconds(metrics.get('seconds'))}.",
    ]
    histories = {"teacher": teacher.get("history") or [], **{n: s["history"] for n, s in students.items()}}
    return Report(
        title="distill report: sst2",
        description=metrics["description"],
        summary=summary,
        tables=[Table("Teacher vs students (SST-2, 872 test sentences)", header, rows)],
        notes=notes,
        images={
            **_history_plot(histories, "test_accuracy"),
            "accuracy_vs_params.png": plots.accuracy_vs_size(
                [{"name": "teacher", "params": teacher["params"], "accuracy": teacher["accuracy"]}]
                + [{"name": n, "params": s["params"], "accuracy": s["accuracy"]} for n, s in students.items()]
            ),
        },
    )


def lm_report(metrics: dict[str, Any]) -> Report:
    rows_in = metrics["models"]
    header = [
        "model",
        "held-out perplexity",
        "KL to teacher",
        "next-token agreement",
        "parameters",
        "size",
        "tokens/s (batch 16)",
        "train time",
    ]
    rows = []
    for name, m in rows_in.items():
        rows.append(
            [
                name,
                num(m["perplexity"], 2),
                num(m.get("kl_to_teacher"), 3),
                pct(m.get("agreement")),
                count(m["params"]),
                size(m.get("size_bytes")),
                count(round(m["tokens_per_second"])),
                seconds(m.get("train_seconds")),
            ]
        )
    distilled, alone, teacher = rows_in["student-distilled"], rows_in["student-alone"], rows_in["teacher"]
    summary = [
        f"Distilled from the teacher's cached top-{metrics['cache']['top_k']} log-probs, the student reaches "
        f"perplexity **{num(distilled['perplexity'], 2)}** against {num(alone['perplexity'], 2)} trained alone on "
        f"the same texts (teacher {num(teacher['perplexity'], 2)}), and agrees with the teacher's next token "
        f"**{pct(distilled['agreement'])}** of the time against {pct(alone['agreement'])}.",
        f"The student has {ratio(teacher['params'] / distilled['params'])} fewer parameters and processes "
        f"{ratio(distilled['tokens_per_second'] / teacher['tokens_per_second'])} as many tokens per second.",
        f"The cache holds {count(metrics['cache']['positions'])} positions at "
        f"{num(metrics['cache']['bytes_per_position'], 1)} bytes each.",
    ]
    loss = metrics["loss"]
    notes = [
        f"Loss of the distilled student: {loss['alpha']} * T^2 * {loss['divergence']}(teacher || student) on the "
        f"cache's top-k plus a tail bucket + {1 - loss['alpha']:.2f} * CE(next token), T = {loss['temperature']}, "
        f"computed in chunks of {loss['chunk_size']} tokens; the student alone trains on CE for as many steps.",
        "Tokens per second: teacher and students timed side by side on the same held-out batch.",
        f"Whole run: {seconds(metrics.get('seconds'))}.",
    ]
    histories = {name: m["history"] for name, m in rows_in.items()}
    return Report(
        title="distill report: lm",
        description=metrics["description"],
        summary=summary,
        tables=[Table("Teacher vs students (held-out texts)", header, rows)],
        notes=notes,
        images={"learning_curves.png": plots.learning_curves(histories, "loss")},
    )


def _money(value: float | None) -> str:
    return "–" if value is None else f"${value:.4f}"


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


def reasoning_report(metrics: dict[str, Any]) -> Report:
    models, traces, generation, prices = metrics["models"], metrics["traces"], metrics["generation"], metrics["prices"]
    teacher, on_traces, on_answers = models["teacher"], models["student-traces"], models["student-answers"]
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
    tokens = traces["tokens"]
    trace_header = ["questions", "traces", "per question", "verified", "pass rate", "questions solved", "kept",
                    "rejected (wrong / no answer)", "prompt tokens (per trace)", "completion tokens", "cost"]  # fmt: skip
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
        ]
    ]
    operations = ["+", "-", "*", "/"]
    arithmetic = [
        [name]
        + [
            f"{pct(c['right'] / c['written'])} of {count(c['written'])}" if c["written"] else "–"
            for c in (m.get("calculations", {}).get(op, {"written": 0}) for op in operations)
        ]
        for name, m in models.items()
    ]
    diff = on_traces["accuracy"] - on_answers["accuracy"]
    summary = [
        f"The student trained on the teacher's verified reasoning traces solves **{pct(on_traces['accuracy'])}** of "
        f"the held-out problems, the same student trained on final answers only **{pct(on_answers['accuracy'])}** "
        f"({'+' if diff >= 0 else ''}{100 * diff:.1f} points); the teacher solves {pct(teacher['accuracy'])}.",
        f"The student has {ratio(teacher['params'] / on_traces['params'])} fewer parameters than the teacher and "
        f"processes {ratio(on_traces['tokens_per_second'] / teacher['tokens_per_second'])} as many tokens per second.",
        "The teacher's calculations in its held-out answers are right for "
        + ", ".join(f"{cell} '{op}'" for op, cell in zip(operations, arithmetic[list(models).index("teacher")][1:]))
        + "; only traces whose final answer verifies reach the student.",
        *_token_kd_summary(models),
        f"The teacher, served over the OpenAI-compatible API, wrote {count(traces['traces'])} traces for "
        f"{count(traces['questions'])} questions; {pct(traces['pass_rate'])} had the right final answer "
        f"({count(traces['kept'])} kept for training), at a cost of {_money(traces.get('cost'))} at the nominal prices.",
    ]
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
    histories = {name: m["history"] for name, m in models.items()}
    return Report(
        title="distill report: reasoning",
        description=metrics["description"],
        summary=summary,
        tables=[
            Table("Teacher vs students (held-out problems)", header, rows),
            Table("Traces", trace_header, trace_rows),
            Table(
                "Calculations 'a op b = c' in the held-out answers that are right", ["model", *operations], arithmetic
            ),
        ],
        notes=notes,
        images={
            **_history_plot(histories, "loss"),
            "accuracy_vs_params.png": plots.accuracy_vs_size(
                [{"name": n, "params": m["params"], "accuracy": m["accuracy"]} for n, m in models.items()],
                ylabel="held-out accuracy (%)",
            ),
        },
    )


REPORTS: dict[str, Callable[[dict[str, Any]], Report]] = {
    "mnist1d": classification_report,
    "digits": classification_report,
    "train": classification_report,
    "stsb": stsb_report,
    "sst2": sst2_report,
    "lm": lm_report,
    "reasoning": reasoning_report,
}
