"""Trackers fed by the training loop's reports: MLflow's local store, TensorBoard's event files and W&B's offline
run folder receive the runs' figures, as `distill train-lm`, `distill run` and `distill train` run them."""

import json
import os

import pytest

from conftest import tiny_gpt2
from distill import config as cfg
from distill.errors import DistillError
from distill.progress import RecordingReporter
from distill.recipes.digits import DigitsConfig
from distill.trackers import TrackerSettings, TrackingReporter, open_trackers, report_to_of
from test_cli import SMALL, assert_one_line_error, distill_cli

ROWS = [
    {"prompt": "q : the dog runs", "completion": "a : the dog plays"},
    {"prompt": "q : a great movie", "completion": "a : best film of the year"},
    {"text": "the cat is happy and the dog is sad"},
    {"question": "q : a fun story", "answer": "a : very funny"},
]
ENV = {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "offline",
       "MLFLOW_TRACKING_URI": "", "WANDB_API_KEY": ""}  # fmt: skip


@pytest.fixture(autouse=True)
def local_trackers(monkeypatch):
    """MLflow's file store allowed (as the CLI allows it), no user tracking settings, W&B offline."""
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")


def mlflow_run(directory):
    """(client, the one run) of the local MLflow store in `directory`."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=(directory / "mlruns").resolve().as_uri())
    experiments = [e for e in client.search_experiments() if e.name != "Default"]
    assert len(experiments) == 1
    runs = client.search_runs([experiments[0].experiment_id])
    assert len(runs) == 1
    return client, experiments[0], runs[0]


def history(client, run, key):
    return sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))


def lm_job(tmp_path):
    tiny_gpt2(tmp_path / "student", layers=1, seed=1)
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(r) for r in ROWS * 3) + "\n")
    (tmp_path / "eval.jsonl").write_text("\n".join(json.dumps(r) for r in ROWS) + "\n")
    path = tmp_path / "job.yaml"
    path.write_text("student: student\ndata: train.jsonl\neval_data: eval.jsonl\nmax_length: 32\n"
                    "train:\n  epochs: 2\n  batch_size: 4\n  lr: 0.003\n  report_to: [mlflow, tensorboard]\n")  # fmt: skip
    return path


def test_train_lm_feeds_mlflow_and_tensorboard_the_steps_epochs_config_and_metrics(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    result = distill_cli("train-lm", "--config", lm_job(tmp_path), "--output", tmp_path / "run", cwd=tmp_path, env=ENV)
    assert result.returncode == 0, result.stderr
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    client, experiment, run = mlflow_run(tmp_path / "run" / "trackers")
    assert experiment.name == "distill-train-lm" and run.info.run_name == "run" and run.info.status == "FINISHED"
    steps = history(client, run, "student/loss")
    assert [s for s, _ in steps] == list(range(1, 7))  # 12 rows in batches of 4, two epochs: one value a step
    for record in metrics["history"]:  # each epoch's mean loss is the mean of its steps' losses
        own = [v for s, v in steps if record["step"] - 3 < s <= record["step"]]
        assert sum(own) / len(own) == pytest.approx(record["loss"], rel=1e-6)
        assert history(client, run, "student/epoch/lr")[record["epoch"] - 1] == (
            record["step"],
            pytest.approx(record["lr"]),
        )
    assert run.data.params["train.lr"] == "0.003" and run.data.params["train.report_to"] == '["mlflow", "tensorboard"]'
    assert run.data.metrics["final/eval/perplexity"] == pytest.approx(metrics["eval"]["perplexity"])
    events = EventAccumulator(str(tmp_path / "run" / "trackers" / "tensorboard"))
    events.Reload()
    scalars = [(e.step, e.value) for e in events.Scalars("student/loss")]
    assert [s for s, _ in scalars] == [s for s, _ in steps]
    assert [v for _, v in scalars] == pytest.approx([v for _, v in steps], rel=1e-6)
    assert "student/epoch/loss" in events.Tags()["scalars"] and "final/eval/perplexity" in events.Tags()["scalars"]


def test_run_digits_reports_every_training_run_to_mlflow(tmp_path):
    out = tmp_path / "run"
    result = distill_cli("run", "--recipe", "digits", *SMALL, "--set", "student_train.report_to=[mlflow]",
                         "--output", out, "--json", cwd=tmp_path, env=ENV)  # fmt: skip
    assert result.returncode == 0, result.stderr
    metrics = json.loads(result.stdout)
    client, experiment, run = mlflow_run(out / "trackers")
    assert experiment.name == "distill-digits" and run.info.status == "FINISHED"
    records = json.loads((out / "metrics.json").read_text())["history"]
    assert sorted(records) == ["student-alone", "student-distilled", "teacher-0"]
    for name, epochs in records.items():  # every training run of the recipe, not only the section that asked
        logged = history(client, run, f"{name}/epoch/test_accuracy")
        assert logged == [(r["step"], pytest.approx(r["test_accuracy"])) for r in epochs], name
        assert [s for s, _ in history(client, run, f"{name}/loss")] == list(range(1, epochs[-1]["step"] + 1)), name
    last = history(client, run, "student-distilled/epoch/test_accuracy")[-1][1]
    assert last == pytest.approx(metrics["student_distilled"]["accuracy"])  # the final model's test accuracy
    assert run.data.metrics["final/student_distilled/accuracy"] == pytest.approx(
        metrics["student_distilled"]["accuracy"]
    )
    assert run.data.params["student_train.epochs"] == "2" and run.data.params["teacher_train.epochs"] == "3"


def test_train_on_arrays_reports_to_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    rows = ["x0,x1,label"] + [f"{i % 7},{(i * 3) % 5},{i % 2}" for i in range(40)]
    (tmp_path / "d.csv").write_text("\n".join(rows) + "\n")
    (tmp_path / "job.yaml").write_text("data:\n  train: d.csv\ntrain:\n  epochs: 2\n  batch_size: 8\n"
                                       "  report_to: [tensorboard]\n")  # fmt: skip
    result = distill_cli(
        "train", "--config", tmp_path / "job.yaml", "--output", tmp_path / "run", cwd=tmp_path, env=ENV
    )
    assert result.returncode == 0, result.stderr
    events = EventAccumulator(str(tmp_path / "run" / "trackers" / "tensorboard"))
    events.Reload()
    losses = [e for tag in events.Tags()["scalars"] if tag.endswith("/loss") for e in events.Scalars(tag)]
    assert losses and max(e.step for e in losses) == 2 * 4  # 32 training rows in batches of 8, two epochs


def test_wandb_offline_writes_its_run_folder_and_reporter_forwards_everything(tmp_path):
    inner = RecordingReporter()
    settings = TrackerSettings(tmp_path / "trackers", "run-1", "distill-test", wandb_mode="offline")
    reporter = TrackingReporter(inner, open_trackers(["wandb"], settings))
    reporter.start(cfg.resolve(DigitsConfig, {}))
    reporter.stage("student", total=4)
    for step in range(4):
        reporter.advance(1, loss=1.0 / (step + 1))
    reporter.event("epoch", run="student", epoch=1, step=4, loss=0.5, lr=0.01, test_accuracy=0.75)
    reporter.end()
    reporter.finish({"student": {"accuracy": 0.75}, "history": [{"loss": 1.0}]})
    assert inner.stages == ["student"]
    assert inner.events == [("epoch", {"run": "student", "epoch": 1, "step": 4, "loss": 0.5, "lr": 0.01,
                                       "test_accuracy": 0.75})]  # fmt: skip
    folders = list((tmp_path / "trackers" / "wandb").glob("offline-run-*"))
    assert len(folders) == 1
    files = list(folders[0].glob("run-*.wandb"))
    assert len(files) == 1 and files[0].stat().st_size > 0
    assert json.loads((tmp_path / "trackers" / "runs.json").read_text())["wandb"] in files[0].name


def test_a_resumed_run_continues_its_mlflow_run(tmp_path):
    settings = TrackerSettings(tmp_path / "trackers", "run", "distill-test")
    first = TrackingReporter(RecordingReporter(), open_trackers(["mlflow"], settings))
    first.stage("student")
    first.advance(1, loss=2.0)
    first.finish(None, "killed")
    again = TrackingReporter(RecordingReporter(), open_trackers(["mlflow"], TrackerSettings(
        tmp_path / "trackers", "run", "distill-test", resume=True)))  # fmt: skip
    again.stage("student")
    again.advance(2, loss=1.0)
    again.finish({"accuracy": 0.5})
    client, _, run = mlflow_run(tmp_path / "trackers")
    assert history(client, run, "student/loss") == [(1, 2.0), (2, 1.0)] and run.info.status == "FINISHED"


def test_report_to_is_the_union_of_the_train_sections():
    config = cfg.resolve(DigitsConfig, {}, ["teacher_train.report_to=[wandb]", "student_train.report_to=[mlflow]"])
    assert report_to_of(config) == ["mlflow", "wandb"]
    assert report_to_of(cfg.resolve(DigitsConfig, {})) == []


def test_trackers_that_cannot_start_are_one_line_errors(tmp_path, monkeypatch):
    settings = TrackerSettings(tmp_path / "trackers", "run", "distill-test", mlflow_uri="nowhere://at/all")
    with pytest.raises(DistillError, match="^mlflow could not start: "):
        open_trackers(["tensorboard", "mlflow"], settings)
    monkeypatch.setitem(__import__("sys").modules, "wandb", None)  # as if not installed
    with pytest.raises(DistillError, match=r"train.report_to names wandb, which is not installed here; pip install"):
        open_trackers(["wandb"], settings)
    with pytest.raises(DistillError, match="unknown tracker 'neptune'"):
        open_trackers(["neptune"], settings)


def test_unknown_or_uninstalled_trackers_stop_train_lm_at_once(tmp_path):
    job = lm_job(tmp_path)
    unknown = distill_cli("train-lm", "--config", job, "--set", "train.report_to=[neptune]", cwd=tmp_path, env=ENV)
    assert_one_line_error(unknown, "train.report_to.0: Input should be 'tensorboard', 'mlflow' or 'wandb'")
    hidden = tmp_path / "hidden"  # a `wandb` module that fails to import, found before the installed one
    hidden.mkdir()
    (hidden / "wandb.py").write_text("raise ImportError('No module named wandb')\n")
    env = {**ENV, "PYTHONPATH": os.pathsep.join([str(hidden), os.environ.get("PYTHONPATH", "")])}
    missing = distill_cli("train-lm", "--config", job, "--set", "train.report_to=[wandb]", "--output",
                          tmp_path / "run", cwd=tmp_path, env=env)  # fmt: skip
    assert_one_line_error(missing, "train.report_to names wandb, which is not installed here")
    assert not (tmp_path / "run" / "student").exists()  # nothing trained
