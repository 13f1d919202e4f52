"""The command line, run as a user runs it: a subprocess, its exit status, its one-line errors."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from distill import models
from distill.config import ModelSpec

SMALL = ["--epochs", "2", "--teacher-epochs", "3", "--transfer-size", "600"]


def distill_cli(*args, cwd=None, timeout=300, env=None):
    merged = {**os.environ, "DISTILL_CACHE": str(Path(cwd or ".") / ".cache"), **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "distill.cli", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=timeout,
        env=merged,
    )


def assert_one_line_error(result, fragment):
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and errors[0] == lines[-1], result.stderr  # progress bars may come before it
    assert fragment in errors[0], errors[0]
    assert "Traceback" not in result.stderr


def test_run_digits_writes_every_output(tmp_path):
    out = tmp_path / "run"
    result = distill_cli("run", "--recipe", "digits", *SMALL, "--output", out, "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    metrics = json.loads(result.stdout)
    for key in (
        "recipe",
        "teacher",
        "student_alone",
        "student_distilled",
        "gap_closed",
        "retention",
        "speedup",
        "compression",
        "seconds",
    ):
        assert key in metrics
    for key in ("accuracy", "params", "latency_ms", "throughput"):
        assert key in metrics["teacher"]
    for key in ("accuracy", "params", "latency_ms", "throughput", "agreement", "kl_to_teacher", "ece"):
        assert key in metrics["student_distilled"]
    assert metrics["student_distilled"]["transfer_rows"] == 600
    for name in (
        "metrics.json",
        "report.md",
        "report.html",
        "config.yaml",
        "student/model.safetensors",
        "student/model.json",
        "learning_curves.png",
    ):
        assert (out / name).exists(), name
    model, spec, shape, classes = models.load(out / "student")
    assert shape == (8, 8) and classes == 10


def test_run_mnist1d_ensemble_prints_the_table(tmp_path):
    result = distill_cli("run", "--teachers", "2", *SMALL, "--output", tmp_path / "run", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "student distilled" in result.stdout and "ensemble" in result.stdout
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["teacher"]["members"] == 2 and len(metrics["teacher"]["member_accuracy"]) == 2
    assert "student_from_single_teacher" in metrics
    assert (tmp_path / ".cache" / "mnist1d").is_dir()  # the generated transfer set is kept for the next run


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["run", "--recipe", "imagenet"], "unknown recipe 'imagenet'; choose one of mnist1d, digits, stsb, sst2"),
        (["run", "--recipe", "stsb", "--teachers", "2"], "--teachers does not apply to the stsb recipe"),
        (["run", "--recipe", "digits", "--teacher", "x"], "--teacher does not apply to the digits recipe"),
        (["run", "--recipe", "sst2", "--data-dir", "nowhere"], "the sst2 recipe needs the reference data sets"),
        (["run", "--teachers", "many"], "Invalid value for '--teachers'"),
        (["run", "--temperature", "0"], "loss.temperature: Input should be greater than 0"),
        (["run", "--divergence", "l2"], "loss.divergence"),
        (["run", "--bogus"], "No such option: --bogus"),
        (["run", "--resume", "--output", "nowhere"], "cannot resume: nowhere does not exist"),
        (["train", "--config", "missing.yaml"], "config file missing.yaml does not exist"),
        (["report", "."], "metrics.json does not exist"),
    ],
)
def test_bad_options_get_one_line(tmp_path, args, fragment):
    assert_one_line_error(distill_cli(*args, cwd=tmp_path), fragment)


def write_job(tmp_path, **extra):
    lines = ["data:", "  train: train.csv", "train:", "  epochs: 2", "  batch_size: 16"]
    for key, value in extra.items():
        lines.append(f"{key}: {value}")
    (tmp_path / "job.yaml").write_text("\n".join(lines) + "\n")
    return tmp_path / "job.yaml"


def write_csv(path, rows=60, features=4, classes=3, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(rows, features))
    y = rng.integers(0, classes, size=rows)
    header = ",".join([f"f{i}" for i in range(features)] + ["label"])
    body = "\n".join(",".join([*map(str, r), str(label)]) for r, label in zip(x, y))
    path.write_text(header + "\n" + body + "\n")


def test_train_plain_then_distill_from_it(tmp_path):
    write_csv(tmp_path / "train.csv")
    result = distill_cli("train", "--config", write_job(tmp_path), "--output", tmp_path / "teacher", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "teacher" / "model" / "model.safetensors").exists()
    job = write_job(tmp_path, teacher="teacher/model", student="{family: mlp, width: 8, depth: 1}")
    result = distill_cli("train", "--config", job, "--output", tmp_path / "student", "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    metrics = json.loads(result.stdout)
    assert metrics["student_distilled"]["params"] < metrics["teacher"]["params"]


@pytest.mark.parametrize(
    "csv_text, fragment",
    [
        ("a,b,klass\n1,2,0\n", "has no column 'label'"),
        ("a,b,label\n1,2,0\n1,2\n", "line 3 of"),
        ("a,b,label\n1,x,0\n", "'x' is not a number"),
    ],
)
def test_train_bad_data_files(tmp_path, csv_text, fragment):
    (tmp_path / "train.csv").write_text(csv_text)
    assert_one_line_error(distill_cli("train", "--config", write_job(tmp_path), cwd=tmp_path), fragment)


def test_train_teacher_of_other_width_and_labels_out_of_range(tmp_path):
    spec = ModelSpec(family="mlp", width=4, depth=1)
    models.save(models.build(spec, (4,), 2), tmp_path / "t2", spec, (4,), 2)
    write_csv(tmp_path / "train.csv", classes=3)
    result = distill_cli("train", "--config", write_job(tmp_path, teacher="t2"), cwd=tmp_path)
    assert_one_line_error(result, "outside 0..1")
    models.save(models.build(spec, (5,), 3), tmp_path / "t5", spec, (5,), 3)
    result = distill_cli("train", "--config", write_job(tmp_path, teacher="t5"), cwd=tmp_path)
    assert_one_line_error(result, "the teacher takes inputs of shape [5] but the data has [4]")
    job = write_job(tmp_path)
    (tmp_path / "train.csv").write_text("a,label\n1,0\n2,1\n")
    result = distill_cli(
        "train", "--config", job, "--set", "data.num_classes=2", "--set", "data.test_fraction=0.5", cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr


def test_non_finite_loss_is_one_line(tmp_path):
    write_csv(tmp_path / "train.csv")
    result = distill_cli(
        "train",
        "--config",
        write_job(tmp_path),
        "--set",
        "train.lr=1e30",
        "--set",
        "train.grad_clip=null",
        cwd=tmp_path,
    )
    assert_one_line_error(result, "the loss became non-finite")


def test_corrupt_cache_on_resume_is_one_line(tmp_path):
    write_csv(tmp_path / "train.csv")
    assert (
        distill_cli("train", "--config", write_job(tmp_path), "--output", tmp_path / "t", cwd=tmp_path).returncode == 0
    )
    job = write_job(tmp_path, teacher="t/model")
    out = tmp_path / "run"
    assert distill_cli("train", "--config", job, "--output", out, cwd=tmp_path).returncode == 0
    shard = out / "cache" / "teacher" / "logprobs-00000.npy"
    shard.write_bytes(shard.read_bytes()[:-8] + b"\x00" * 8)
    (out / "models" / "student-distilled" / "history.json").unlink()
    result = distill_cli("train", "--config", job, "--output", out, "--resume", cwd=tmp_path)
    assert_one_line_error(result, "fails its sha256 check")


@pytest.mark.slow
def test_run_killed_and_resumed_ends_like_an_uninterrupted_run(tmp_path):
    args = ["run", "--recipe", "digits", "--epochs", "6", "--teacher-epochs", "4", "--transfer-size", "4000", "--json"]
    straight = distill_cli(*args, "--output", tmp_path / "a", cwd=tmp_path)
    assert straight.returncode == 0, straight.stderr
    expected = json.loads(straight.stdout)

    env = {**os.environ, "DISTILL_CACHE": str(tmp_path / ".cache")}
    process = subprocess.Popen(
        [sys.executable, "-m", "distill.cli", *args, "--output", str(tmp_path / "b")],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    checkpoint = tmp_path / "b" / "checkpoints" / "student-distilled" / "checkpoint.pt"
    deadline = time.time() + 120
    while not checkpoint.exists() and time.time() < deadline and process.poll() is None:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    assert process.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert not (tmp_path / "b" / "metrics.json").exists()

    resumed = distill_cli(*args, "--output", tmp_path / "b", "--resume", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    got = json.loads(resumed.stdout)
    for part in ("teacher", "student_alone", "student_distilled"):
        assert got[part]["accuracy"] == expected[part]["accuracy"], part
    for key in ("agreement", "kl_to_teacher", "ece"):
        assert got["student_distilled"][key] == pytest.approx(expected["student_distilled"][key], rel=1e-6)
