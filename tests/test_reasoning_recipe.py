"""The reasoning recipe end to end on a tiny configuration: a teacher GPT-2 that memorises a dozen one-step problems,
served over HTTP on loopback, traces sampled and verified, two students, the report; and a resumed run that asks
the teacher for nothing."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from distill.config import build
from distill.recipes import RECIPES, run_recipe
from distill.recipes.reasoning import ReasoningConfig
from distill.stages import RunContext

TINY: dict[str, Any] = {
    "problems": 12,
    "held_out": 6,
    "steps": [1],
    "vocab_size": 300,
    "max_length": 96,
    "teacher": {"layers": 2, "width": 64, "heads": 2},
    "student": {"layers": 1, "width": 16, "heads": 2},
    "teacher_train": {"epochs": 40, "batch_size": 6, "lr": 0.01, "warmup": 0.1, "schedule": "cosine"},
    "student_train": {"epochs": 1, "batch_size": 4},
    "samples": 2,
    "temperature": 0.0,
    "max_new_tokens": 40,
    "concurrency": 4,
}


def lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def first_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    output = tmp_path_factory.mktemp("reasoning")
    recipe = RECIPES["reasoning"]
    config = build(recipe.config, {"recipe": "reasoning", **TINY})
    assert isinstance(config, ReasoningConfig)
    return output, run_recipe(recipe, config, RunContext(output))


def test_the_recipe_runs_end_to_end_and_writes_its_outputs(first_run: tuple[Path, dict[str, Any]]) -> None:
    output, metrics = first_run
    n_traces = TINY["problems"] * TINY["samples"]
    traces = lines(output / "traces.jsonl")
    assert len(traces) == n_traces and len({t["id"] for t in traces}) == n_traces  # one row per sample, no duplicates
    assert all(t["gold"] and t["question"] and t["prompt"] == t["question"] + "\n" for t in traces)

    summary = json.loads((output / "traces" / "summary.json").read_text())
    verified, rejected = lines(output / "traces" / "verified.jsonl"), lines(output / "traces" / "rejected.jsonl")
    assert summary == metrics["traces"]
    assert summary["questions"] == TINY["problems"] and summary["traces"] == n_traces
    assert summary["traces_per_question"] == TINY["samples"]
    assert summary["verified"] + summary["rejected"] == n_traces
    assert summary["rejected"] == summary["rejected_no_answer"] + summary["rejected_wrong_answer"] == len(rejected)
    assert summary["kept"] == len(verified) == summary["verified"] > 0  # no dedupe, no limit: every pass is kept
    assert summary["pass_rate"] == pytest.approx(summary["verified"] / n_traces)
    assert all(row["prompt"].endswith("\n") and "####" in row["completion"] for row in verified)
    assert summary["cost"] > 0  # nominal prices by default

    generation = metrics["generation"]
    assert generation["written"] == n_traces and generation["skipped"] == 0 and generation["failed"] == 0
    assert generation["requests"] == TINY["problems"]  # n samples per request

    models = metrics["models"]
    assert set(models) == {"teacher", "student-traces", "student-answers", "student-traces-kd"}
    for name, row in models.items():
        assert 0.0 <= row["accuracy"] <= 1.0 and row["problems"] == TINY["held_out"]
        assert row["params"] > 0 and row["size_bytes"] > 0 and row["tokens_per_second"] > 0
        assert len(lines(output / "predictions" / f"{name}.jsonl")) == TINY["held_out"]
        assert (output / "models" / name / "config.json").is_file()
    assert models["student-traces"]["params"] == models["student-answers"]["params"] < models["teacher"]["params"]
    assert models["student-traces"]["train_rows"] == len(verified)
    assert models["student-answers"]["train_rows"] == TINY["problems"]  # baseline "all": every traced question
    assert models["student-answers"]["train_steps"] >= models["student-traces"]["train_steps"]
    # The third student: the same traces, also the teacher's top 5 log-probs at each trace token (the API's).
    assert all(len(row["top_logprobs"]["top"][0]) == 5 for row in verified)
    with_kd = models["student-traces-kd"]
    assert with_kd["train_rows"] == len(verified) and with_kd["params"] == models["student-traces"]["params"]
    cache = with_kd["token_cache"]
    assert cache["top_k"] == 6 and cache["rows_with_logprobs"] == len(verified)
    assert cache["coverage"] > 0.9  # the teacher's own tokenizer: only the <eos> positions lack a distribution
    assert all(epoch["kd"] > 0 for epoch in with_kd["history"])

    for name in ("report.md", "report.html", "metrics.json", "config.yaml", "accuracy_vs_params.png"):
        assert (output / name).is_file(), name
    report = (output / "report.md").read_text()
    for phrase in ("student-traces", "student-answers", "teacher", "pass rate", "cost", "top 5 log-probs"):
        assert phrase in report


def test_the_report_has_the_task_scores_of_every_model(first_run: tuple[Path, dict[str, Any]]) -> None:
    """lm-evaluation-harness on the held-out problems: each model's exact-match answers and the solutions'
    perplexity, with every student's retention; the exact match agrees with the recipe's own greedy accuracy."""
    output, metrics = first_run
    tasks = metrics["tasks"]
    assert set(tasks["scores"]) == set(metrics["models"]) and tasks["teacher"] == "teacher"
    for name, scores in tasks["scores"].items():
        assert scores["reasoning_answers"]["exact_match"] == pytest.approx(metrics["models"][name]["accuracy"]), name
        assert scores["reasoning_solutions"]["word_perplexity"] > 1
    assert set(tasks["retention"]) == set(metrics["models"]) - {"teacher"}
    assert "Task scores (lm-evaluation-harness)" in (output / "report.md").read_text()


def test_a_resumed_run_reuses_the_traces_and_models(first_run: tuple[Path, dict[str, Any]]) -> None:
    output, metrics = first_run
    recipe = RECIPES["reasoning"]
    again = run_recipe(recipe, build(recipe.config, {"recipe": "reasoning", **TINY}), RunContext(output, resume=True))
    n_traces = TINY["problems"] * TINY["samples"]
    assert again["generation"]["skipped"] == n_traces
    assert again["generation"]["written"] == 0 and again["generation"]["requests"] == 0
    assert len(lines(output / "traces.jsonl")) == n_traces
    assert again["traces"] == metrics["traces"]
    for name, row in metrics["models"].items():  # loaded, not retrained: same history, same answers
        assert again["models"][name]["history"] == row["history"]
        assert again["models"][name]["accuracy"] == row["accuracy"]


def test_the_teacher_is_served_over_http_in_a_thread_until_the_block_ends(
    first_run: tuple[Path, dict[str, Any]],
) -> None:
    import httpx

    from distill.serve import serve_in_thread

    output, _ = first_run
    with serve_in_thread(output / "models" / "teacher", model_name="tiny") as base_url:
        assert base_url.startswith("http://127.0.0.1:") and base_url.endswith("/v1")
        assert httpx.get(f"{base_url}/models").json()["data"][0]["id"] == "tiny"
        body = {"model": "tiny", "prompt": "Tom has 3 boxes.\n", "max_tokens": 4, "temperature": 0}
        assert httpx.post(f"{base_url}/completions", json=body).json()["usage"]["prompt_tokens"] > 0
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{base_url}/models")


def test_a_partial_training_setting_keeps_the_recipes_other_settings() -> None:
    config = build(ReasoningConfig, {"teacher_train": {"epochs": 7}, "student_train": {"lr": 0.001}})
    assert config.teacher_train.epochs == 7 and config.teacher_train.batch_size == 16
    assert config.teacher_train.schedule == "cosine"
    assert config.student_train.lr == 0.001 and config.student_train.epochs == 10


def test_the_cost_of_the_result_per_verified_trace_and_per_point_of_accuracy() -> None:
    from distill.recipes.reasoning_report import cost_of_result

    models = {"student-traces": {"accuracy": 0.75}, "student-answers": {"accuracy": 0.25}}
    traces = {"cost": 1.5, "verified": 300, "tokens": {"completion": 6000}}
    spent = cost_of_result(models, traces)
    assert spent["per_verified_trace"] == pytest.approx(0.005)
    assert spent["per_accuracy_point"] == pytest.approx(0.02)
    assert spent["per_point_over_answers_only"] == pytest.approx(0.03)
    assert spent["completion_tokens_per_verified_trace"] == pytest.approx(20)
    nothing = cost_of_result(
        {"student-traces": {"accuracy": 0.2}, "student-answers": {"accuracy": 0.3}},
        {"cost": None, "verified": 0, "tokens": {"completion": 0}},
    )
    assert set(nothing.values()) == {None}
