"""`distill eval-lm` and `distill.eval_lm`: task scores with lm-evaluation-harness on local task files, and the
student's retention; the harness runs offline on local data and local model folders."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from conftest import TINY_WORDS, tiny_gpt2
from distill import eval_lm

PERPLEXITIES = ("word_perplexity", "byte_perplexity", "bits_per_byte")
OFFLINE = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """A teacher and a student (tiny random GPT-2s over one tokenizer), and three local task files."""
    root = tmp_path_factory.mktemp("eval")
    tiny_gpt2(root / "teacher", layers=2, seed=0)
    tiny_gpt2(root / "student", layers=1, seed=1)
    words = TINY_WORDS[:12]
    choice = [{"query": f"the {w} was", "choices": ["good", "bad", "fun"], "gold": i % 3} for i, w in enumerate(words)]
    texts = [{"text": " ".join(words[i : i + 6])} for i in range(6)]
    answers = [{"question": f"the {w}", "answer": "#### 4"} for w in words[:4]]
    for name, rows in (("choice", choice), ("texts", texts), ("answers", answers)):
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def test_scores_and_retention_of_local_tasks(pair, monkeypatch):
    for name, value in OFFLINE.items():
        monkeypatch.setenv(name, value)
    tasks = [
        eval_lm.LocalTask("t_choice", "choice", pair / "choice.jsonl"),
        eval_lm.LocalTask("t_texts", "perplexity", pair / "texts.jsonl"),
        eval_lm.LocalTask("t_answers", "answer", pair / "answers.jsonl", max_gen_toks=4),
    ]
    include = eval_lm.write_tasks(tasks, pair / "tasks")
    names = [t.name for t in tasks]
    by_model = {
        name: eval_lm.scores(eval_lm.Model(path=pair / name), names, include) for name in ("teacher", "student")
    }
    for scores in by_model.values():
        assert 0 <= scores["t_choice"]["acc"] <= 1 and scores["t_answers"]["exact_match"] == 0.0  # "#### 4" unseen
        assert scores["t_texts"]["_higher_is_better"] == dict.fromkeys(PERPLEXITIES, False)
    evaluation = eval_lm.compare(by_model)
    teacher, student = by_model["teacher"]["t_texts"], by_model["student"]["t_texts"]
    kept = evaluation["retention"]["student"]["t_texts"]
    assert kept["word_perplexity"] == pytest.approx(teacher["word_perplexity"] / student["word_perplexity"])
    assert kept["bits_per_byte"] == pytest.approx(teacher["bits_per_byte"] / student["bits_per_byte"])
    assert evaluation["retention"]["student"]["t_answers"]["exact_match"] is None  # the teacher's score is 0
    assert teacher["word_perplexity"] == pytest.approx(
        _word_perplexity(pair / "teacher", pair / "texts.jsonl"), rel=1e-4
    )


def _word_perplexity(folder, path) -> float:
    """The harness's word perplexity computed by hand: exp(-sum of token log-probs / words), each text scored from
    the end-of-text token (the harness's rolling windows fit these short texts whole)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tokenizer = AutoModelForCausalLM.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)
    total, words = 0.0, 0
    for line in path.read_text().splitlines():
        text = json.loads(line)["text"]
        ids = [tokenizer.eos_token_id, *tokenizer(text)["input_ids"]]
        with torch.no_grad():
            logprobs = torch.log_softmax(model(torch.tensor([ids])).logits[0, :-1].float(), -1)
        total += float(logprobs.gather(-1, torch.tensor(ids[1:])[:, None]).sum())
        words += len(text.split())
    return math.exp(-total / words)


def run(*args, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "distill.cli", "eval-lm", *map(str, args)], capture_output=True,
                          text=True, timeout=300, cwd=cwd, env={**os.environ, **OFFLINE})  # fmt: skip


def test_the_command_writes_the_scores_and_the_report(pair, tmp_path):
    done = run("--student", pair / "student", "--teacher", pair / "teacher", "--choice", pair / "choice.jsonl",
               "--perplexity", pair / "texts.jsonl", "--output", "out", cwd=tmp_path)  # fmt: skip
    assert done.returncode == 0, done.stderr
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["tasks"] == ["choice_choice", "perplexity_texts"]
    assert set(metrics["evaluation"]["scores"]) == {"teacher", "student"}
    assert "acc" in metrics["evaluation"]["retention"]["student"]["choice_choice"]
    report = (tmp_path / "out" / "report.md").read_text()
    assert "Task scores (lm-evaluation-harness) and retention" in report and "perplexity_texts" in report


@pytest.mark.parametrize(
    "args, message",
    [
        (["--task", "no_such_task_anywhere"], "lm-evaluation-harness knows no task 'no_such_task_anywhere'"),
        ([], "name at least one task"),
        (["--base-url", "http://127.0.0.1:9/v1"], "--base-url needs --student-model"),
        (["--choice", "{bad}"], "a choice task row needs query, choices, gold"),
    ],
)
def test_bad_input_is_one_error_line(pair, tmp_path, args, message):
    (tmp_path / "bad.jsonl").write_text('{"query": "a"}\n')
    args = [str(tmp_path / "bad.jsonl") if a == "{bad}" else a for a in args]
    done = run("--student", pair / "student", *args, cwd=tmp_path)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and message in lines[-1] and "Traceback" not in done.stderr, done.stderr


def test_a_served_model_scores_as_the_same_model_loaded_locally(pair, monkeypatch):
    """The harness's local-completions against `distill serve` gives the scores of its hf backend on the folder."""
    from distill.serve import serve_in_thread

    for name, value in OFFLINE.items():
        monkeypatch.setenv(name, value)
    tasks = [eval_lm.LocalTask("s_choice", "choice", pair / "choice.jsonl"),
             eval_lm.LocalTask("s_texts", "perplexity", pair / "texts.jsonl")]  # fmt: skip
    include = eval_lm.write_tasks(tasks, pair / "served-tasks")
    names = [t.name for t in tasks]
    local = eval_lm.scores(eval_lm.Model(path=pair / "teacher"), names, include)
    with serve_in_thread(pair / "teacher", model_name="tiny") as base_url:
        served = eval_lm.scores(
            eval_lm.Model(base_url=base_url, name="tiny", tokenizer=pair / "teacher"), names, include
        )
    for task in names:
        for metric, value in local[task].items():
            if not metric.startswith("_"):
                assert served[task][metric] == pytest.approx(value, rel=1e-4), (task, metric)
