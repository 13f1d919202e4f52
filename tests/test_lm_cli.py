"""The language-model commands as a user runs them: cache build/verify, train-lm (also under torchrun), errors."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import run_distributed, tiny_gpt2
from test_cli import assert_one_line_error, distill_cli

ROWS = [
    {"prompt": "q : the dog runs", "completion": "a : the dog plays"},
    {"prompt": "q : a great movie", "completion": "a : best film of the year"},
    {"text": "the cat is happy and the dog is sad"},
    {"prompt": "q : bad food", "completion": "a : very bad"},
    {"question": "q : a fun story", "answer": "a : very funny"},
    {"prompt": "q : the man plays guitar", "completion": "a : the woman plays guitar"},
]


@pytest.fixture
def lm_files(tmp_path):
    teacher, _ = tiny_gpt2(tmp_path / "teacher", layers=3, seed=2)
    tiny_gpt2(tmp_path / "student", layers=1, seed=1)
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(r) for r in ROWS * 4) + "\n")
    (tmp_path / "eval.jsonl").write_text("\n".join(json.dumps(r) for r in ROWS) + "\n")
    return tmp_path


def job(tmp_path, **extra):
    lines = [
        "student: student",
        "data: train.jsonl",
        "eval_data: eval.jsonl",
        "max_length: 32",
        "train:",
        "  epochs: 2",
        "  batch_size: 4",
        "  lr: 0.003",
        "  checkpoint_every: 2",
        "loss:",
        "  chunk_size: 16",
        "  temperature: 1.0",
    ]
    lines += [f"{k}: {v}" for k, v in extra.items()]
    path = tmp_path / "job.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_cache_build_verify_and_train_from_it(lm_files):
    built = distill_cli(
        "cache",
        "build",
        "--teacher",
        lm_files / "teacher",
        "--data",
        lm_files / "train.jsonl",
        "--top-k",
        "8",
        "--out",
        lm_files / "cache",
        "--max-length",
        "32",
        cwd=lm_files,
    )
    assert built.returncode == 0, built.stderr
    assert "checksums verified" in built.stdout
    checked = distill_cli("cache", "verify", lm_files / "cache", cwd=lm_files)
    assert checked.returncode == 0 and json.loads(checked.stdout)["top_k"] == 8
    trained = distill_cli(
        "train-lm", "--config", job(lm_files, cache="cache"), "--output", lm_files / "run", cwd=lm_files
    )
    assert trained.returncode == 0, trained.stderr
    metrics = json.loads(trained.stdout)
    assert metrics["eval"]["perplexity"] > 1 and {"kd", "ce"} <= set(
        json.loads((lm_files / "run" / "metrics.json").read_text())["history"][0]
    )
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(lm_files / "run" / "student").config.n_layer == 1
    shard = next((lm_files / "cache").glob("shard-*.npy"))
    raw = bytearray(shard.read_bytes())
    raw[-3] ^= 0xFF
    shard.write_bytes(bytes(raw))
    assert_one_line_error(distill_cli("cache", "verify", lm_files / "cache", cwd=lm_files), "sha256")


def test_train_lm_from_a_live_teacher_and_refusals(lm_files):
    trained = distill_cli(
        "train-lm", "--config", job(lm_files, teacher="teacher"), "--output", lm_files / "run", cwd=lm_files
    )
    assert trained.returncode == 0, trained.stderr
    assert {"kl_to_teacher", "agreement", "perplexity"} <= set(json.loads(trained.stdout)["eval"])
    from transformers import BertTokenizerFast

    (lm_files / "vocab.txt").write_text("[PAD]\n[UNK]\nother\nwords\n")
    BertTokenizerFast(vocab=str(lm_files / "vocab.txt")).save_pretrained(lm_files / "teacher")  # another vocabulary
    refused = distill_cli("train-lm", "--config", job(lm_files, teacher="teacher"), cwd=lm_files)
    assert_one_line_error(refused, "distill through generated text")
    both = distill_cli("train-lm", "--config", job(lm_files, teacher="teacher", cache="cache"), cwd=lm_files)
    assert_one_line_error(both, "either a live teacher or a cache")
    (lm_files / "bad.jsonl").write_text('{"prompt": "x"}\n')
    bad = distill_cli(
        "train-lm",
        "--config",
        job(lm_files, teacher="teacher"),
        "--set",
        f"data={lm_files / 'bad.jsonl'}",
        cwd=lm_files,
    )
    assert_one_line_error(bad, "line 1 of")


def test_train_lm_under_torchrun_with_two_cpu_processes(lm_files):
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node=2",
        "-m",
        "distill.cli",
        "train-lm",
        "--config",
        str(job(lm_files, teacher="teacher")),
        "--output",
        str(lm_files / "ddp"),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DISTILL_CACHE": str(lm_files / ".cache")}
    result = run_distributed(command, clean=lm_files / "ddp", timeout=300, cwd=lm_files, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((lm_files / "ddp" / "metrics.json").read_text())
    saved = torch.load(lm_files / "ddp" / "checkpoints" / "checkpoint.pt", weights_only=False)
    assert saved["signature"]["processes"] == 2
    assert saved["state"]["step"] == 2 * (6 // 2)  # 24 rows / batch 4 = 6 batches an epoch, shared by 2 processes
    assert metrics["eval"]["perplexity"] > 1


def test_train_lm_killed_and_resumed_ends_like_an_uninterrupted_run(lm_files):
    config = job(lm_files, teacher="teacher")
    straight = distill_cli(
        "train-lm", "--config", config, "--set", "train.epochs=12", "--output", lm_files / "a", cwd=lm_files
    )
    assert straight.returncode == 0, straight.stderr
    env = {**os.environ, "DISTILL_CACHE": str(lm_files / ".cache")}
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "distill.cli",
            "train-lm",
            "--config",
            str(config),
            "--set",
            "train.epochs=12",
            "--output",
            str(lm_files / "b"),
        ],
        cwd=lm_files,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    checkpoint = lm_files / "b" / "checkpoints" / "checkpoint.pt"
    deadline = time.time() + 120
    while time.time() < deadline and process.poll() is None:
        if checkpoint.exists() and torch.load(checkpoint, weights_only=False)["state"]["step"] >= 20:
            break
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    assert process.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    resumed = distill_cli(
        "train-lm", "--config", config, "--set", "train.epochs=12", "--output", lm_files / "b", "--resume", cwd=lm_files
    )
    assert resumed.returncode == 0, resumed.stderr
    a, b = json.loads(straight.stdout)["eval"], json.loads(resumed.stdout)["eval"]
    assert b == pytest.approx(a, rel=1e-5)


def test_train_lm_with_fsdp_on_two_cpu_processes(lm_files):
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node=2",
        "-m",
        "distill.cli",
        "train-lm",
        "--config",
        str(job(lm_files, teacher="teacher")),
        "--set",
        "train.strategy=fsdp",
        "--output",
        str(lm_files / "fsdp"),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DISTILL_CACHE": str(lm_files / ".cache")}
    result = run_distributed(command, clean=lm_files / "fsdp", timeout=300, cwd=lm_files, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    saved = torch.load(lm_files / "fsdp" / "checkpoints" / "checkpoint.pt", weights_only=False)
    assert saved["signature"]["train"]["strategy"] == "fsdp"
    from transformers import AutoModelForCausalLM

    student = AutoModelForCausalLM.from_pretrained(lm_files / "fsdp" / "student")  # whole weights, gathered
    assert torch.equal(student.state_dict()["transformer.wte.weight"], saved["model"]["transformer.wte.weight"])
    assert json.loads((lm_files / "fsdp" / "metrics.json").read_text())["eval"]["perplexity"] > 1
    resumed = run_distributed(command + ["--resume"], timeout=300, cwd=lm_files, env=env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]


def test_run_lm_recipe_on_a_small_corpus(tmp_path):
    words = ["the", "a", "cat", "dog", "movie", "film", "plays", "runs", "is", "was", "good", "bad", "very"]
    rng = random.Random(0)
    lines = [" ".join(rng.choice(words) for _ in range(rng.randint(5, 12))) for _ in range(400)]
    (tmp_path / "corpus.txt").write_text("\n".join(lines) + "\n")
    settings = [
        "corpus=corpus.txt", "vocab_size=300", "max_length=16", "top_k=8",
        "teacher.layers=1", "teacher.width=32", "teacher.heads=2",
        "student.layers=1", "student.width=16", "student.heads=2",
        "teacher_train.epochs=1", "student_train.epochs=1", "tasks=20",
    ]  # fmt: skip
    args = ["run", "--recipe", "lm", "--output", "out", "--json"] + [a for s in settings for a in ("--set", s)]
    result = distill_cli(*args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    metrics = json.loads(result.stdout)
    assert set(metrics["models"]) == {"teacher", "student-distilled", "student-alone"}
    for name in ("student-distilled", "student-alone"):
        row = metrics["models"][name]
        assert row["perplexity"] > 1 and 0 <= row["agreement"] <= 1 and row["kl_to_teacher"] >= 0
        assert row["params"] < metrics["models"]["teacher"]["params"]
    assert metrics["cache"]["top_k"] == 8
    tasks = metrics["tasks"]  # lm-evaluation-harness on the held-out texts: every model, the students' retention
    assert set(tasks["scores"]) == {"teacher", "student-distilled", "student-alone"}
    for name, scores in tasks["scores"].items():
        assert 0 <= scores["lm_continuation"]["acc"] <= 1 and scores["lm_perplexity"]["word_perplexity"] > 1, name
    kept = tasks["retention"]["student-distilled"]["lm_perplexity"]["word_perplexity"]
    teacher, student = (
        tasks["scores"][n]["lm_perplexity"]["word_perplexity"] for n in ("teacher", "student-distilled")
    )
    assert kept == pytest.approx(teacher / student)
    assert (tmp_path / "out" / "report.md").is_file()
    assert "Task scores (lm-evaluation-harness)" in (tmp_path / "out" / "report.md").read_text()
    assert (tmp_path / "out" / "models" / "student-distilled" / "tokenizer.json").is_file()
    again = distill_cli(*args, "--resume", cwd=tmp_path)  # every stage is done: reused, same figures
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["models"]["student-distilled"]["perplexity"] == pytest.approx(
        metrics["models"]["student-distilled"]["perplexity"]
    )
    refused = distill_cli("run", "--recipe", "lm", "--teachers", "3", cwd=tmp_path)
    assert_one_line_error(refused, "--teachers does not apply to the lm recipe")
