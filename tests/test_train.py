import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import blobs, mlp, run_distributed
from distill.config import LossConfig, TrainConfig
from distill.errors import DistillError, NonFiniteLossError, ShapeMismatchError
from distill.evaluate import accuracy, predict
from distill.progress import Cancelled, NullReporter, RecordingReporter
from distill.teachers import LocalTeacher
from distill.train import make_scheduler, train

HERE = Path(__file__).parent


def test_student_alone_learns_and_history_has_named_terms(toy):
    test = blobs(200, seed=9)
    reporter = RecordingReporter()
    result = train(
        mlp(),
        toy,
        TrainConfig(epochs=5, batch_size=32, lr=1e-2),
        evaluate=lambda m: {"test_accuracy": accuracy(predict(m, test.inputs), test.labels)},
        reporter=reporter,
    )
    assert result.steps == 5 * 8
    assert [r["epoch"] for r in result.history] == [1, 2, 3, 4, 5]
    assert set(result.history[0]) >= {"ce", "loss", "lr", "test_accuracy"}
    assert result.final["test_accuracy"] > 0.9
    assert result.history[-1]["loss"] < result.history[0]["loss"]
    assert [kind for kind, _ in reporter.events] == ["epoch"] * 5


def test_distillation_moves_student_towards_teacher(toy):
    teacher_model = mlp(seed=3, width=32)
    train(teacher_model, toy, TrainConfig(epochs=5, batch_size=32, lr=1e-2))
    teacher = LocalTeacher(teacher_model, 4)
    unlabeled = blobs(512, seed=4).unlabeled()
    from distill.data import concat

    data = concat(toy, unlabeled)
    result = train(
        mlp(seed=1),
        data,
        TrainConfig(epochs=4, batch_size=64, lr=1e-2),
        teacher=teacher,
        loss=LossConfig(temperature=2, alpha=0.9),
    )
    assert set(result.history[0]) >= {"kd", "ce", "loss"}
    assert result.history[-1]["kd"] < result.history[0]["kd"]
    test = blobs(300, seed=5)
    agreement = predict(result.model, test.inputs).argmax(-1) == predict(teacher_model, test.inputs).argmax(-1)
    assert agreement.float().mean() > 0.9


@pytest.mark.parametrize("schedule", ["onecycle", "cosine", "constant"])
def test_schedules_warm_up_then_follow_their_shape(schedule):
    model = nn.Linear(2, 2)
    config = TrainConfig(lr=1.0, schedule=schedule, warmup=0.2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1.0)
    scheduler = make_scheduler(optimizer, config, 100)
    lrs = []
    for _ in range(100):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs[0] < 0.2 and max(lrs) == pytest.approx(1.0, rel=0.05)
    peak = lrs.index(max(lrs))
    assert 15 <= peak <= 25
    if schedule == "constant":
        assert lrs[-1] == pytest.approx(1.0)
    else:
        assert lrs[-1] < 0.05


def test_non_finite_loss_is_a_clear_error():
    data = blobs(64)
    data.inputs[5] = float("inf")
    with pytest.raises(NonFiniteLossError, match="non-finite at step 1"):
        train(mlp(), data, TrainConfig(epochs=1, batch_size=64))


def test_teacher_with_other_width_fails_before_training(toy):
    with pytest.raises(ShapeMismatchError, match="5 outputs but the student has 4"):
        train(mlp(), toy, TrainConfig(epochs=1), teacher=LocalTeacher(mlp(classes=5), 5))


def test_labels_outside_teacher_classes_fail(toy):
    toy.labels[3] = 9
    with pytest.raises(DistillError, match="label 9 at row 3"):
        train(mlp(), toy, TrainConfig(epochs=1), teacher=LocalTeacher(mlp(), 4))


class CancelAfter(NullReporter):
    def __init__(self, steps):
        self.steps, self.seen = steps, 0

    def advance(self, steps=1, **metrics):
        self.seen += steps

    def cancelled(self):
        return self.seen >= self.steps


def test_cancel_stops_at_the_next_step_and_leaves_a_checkpoint(toy, tmp_path):
    with pytest.raises(Cancelled):
        train(mlp(), toy, TrainConfig(epochs=3, batch_size=32), checkpoint_dir=tmp_path, reporter=CancelAfter(5))
    saved = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    assert saved["state"]["step"] == 5
    result = train(mlp(), toy, TrainConfig(epochs=3, batch_size=32), checkpoint_dir=tmp_path, resume=True)
    assert result.steps == 24


def test_resume_refuses_a_checkpoint_from_other_settings(toy, tmp_path):
    train(mlp(), toy, TrainConfig(epochs=1, batch_size=32), checkpoint_dir=tmp_path)
    with pytest.raises(DistillError, match="other data or settings"):
        train(mlp(), toy, TrainConfig(epochs=1, batch_size=16), checkpoint_dir=tmp_path, resume=True)
    (tmp_path / "checkpoint.pt").write_bytes(b"garbage")
    with pytest.raises(DistillError, match="cannot read checkpoint"):
        train(mlp(), toy, TrainConfig(epochs=1, batch_size=32), checkpoint_dir=tmp_path, resume=True)


def run_script(out: Path, *flags: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    return subprocess.Popen([sys.executable, str(HERE / "_resumable.py"), str(out), *flags], env=env)


def test_sigkill_then_resume_matches_an_uninterrupted_run(tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    straight.mkdir()
    killed.mkdir()
    assert run_script(straight).wait(timeout=120) == 0
    expected = json.loads((straight / "result.json").read_text())

    process = run_script(killed, "--slow")
    checkpoint = killed / "ckpt" / "checkpoint.pt"
    deadline = time.time() + 60
    while time.time() < deadline:
        if checkpoint.exists() and torch.load(checkpoint, weights_only=False)["state"]["step"] >= 60:
            break
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    assert process.returncode == -signal.SIGKILL
    assert not (killed / "result.json").exists(), "the run finished before it could be killed"
    step_at_kill = torch.load(checkpoint, weights_only=False)["state"]["step"]
    assert 0 < step_at_kill < expected["steps"]

    assert run_script(killed, "--resume").wait(timeout=120) == 0
    resumed = json.loads((killed / "result.json").read_text())
    assert resumed["steps"] == expected["steps"]
    for a, b in zip(resumed["history"], expected["history"]):
        assert {k: v for k, v in a.items()} == pytest.approx({k: v for k, v in b.items()}, rel=1e-6, abs=1e-7)
    assert resumed["history"][-1]["test_accuracy"] == expected["history"][-1]["test_accuracy"]
    for name in expected["weights"]:
        assert torch.allclose(
            torch.tensor(resumed["weights"][name]), torch.tensor(expected["weights"][name]), atol=1e-6
        )


def torchrun(script: Path, *args: str, processes: int = 2) -> subprocess.CompletedProcess:
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={processes}",
        str(script),
        *args,
    ]
    return run_distributed(command, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_ddp_on_two_cpu_processes_trains_one_model(tmp_path):
    result = torchrun(HERE / "_ddp_script.py", str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["world"] == 2
    assert ranks[0]["weights"] == pytest.approx(ranks[1]["weights"], abs=1e-6)  # gradients were averaged
    assert ranks[0]["steps"] == 4 * (40 // 2)  # 40 batches an epoch, shared by two processes
    history = ranks[0]["history"]
    assert history[-1]["kd"] < history[0]["kd"] and history[-1]["test_accuracy"] > 0.9
    saved = torch.load(tmp_path / "ckpt" / "checkpoint.pt", weights_only=False)
    assert saved["signature"]["processes"] == 2 and saved["state"]["step"] == ranks[0]["steps"]
    again = torchrun(HERE / "_ddp_script.py", str(tmp_path), "--resume")  # a finished run resumes as finished
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads((tmp_path / "rank1.json").read_text())["weights"] == pytest.approx(ranks[1]["weights"])


@pytest.mark.parametrize("schedule", ["onecycle", "cosine", "constant"])
@pytest.mark.parametrize("total", [1, 2, 3, 5, 10, 11])
def test_schedules_survive_very_short_runs(schedule, total):
    model = nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1.0)
    scheduler = make_scheduler(optimizer, TrainConfig(lr=1.0, schedule=schedule, warmup=0.1), total)
    for _ in range(total):
        optimizer.step()
        scheduler.step()
        assert 0 <= optimizer.param_groups[0]["lr"] <= 1.0
