import json

from distill import report


def fake_metrics(members=1):
    reliability = {
        "ece": 0.05,
        "confidence": [0.5, 0.9],
        "accuracy": [0.4, float("nan")],
        "count": [3, 0],
        "edges": [0.0, 0.5, 1.0],
    }
    history = [
        {"epoch": 1, "step": 10, "kd": 1.0, "ce": 2.0, "loss": 1.1, "test_accuracy": 0.5},
        {"epoch": 2, "step": 20, "kd": 0.5, "ce": 1.0, "loss": 0.6, "test_accuracy": 0.7},
    ]
    metrics = {
        "recipe": "toy",
        "description": "a <b>toy</b>",
        "teacher": {
            "members": members,
            "accuracy": 0.9,
            "member_accuracy": [0.88] * members,
            "params": 1000,
            "size_bytes": 4000,
            "latency_ms": 1.0,
            "throughput": 100.0,
            "ece": 0.02,
            "reliability": reliability,
            "train_seconds": 3.0,
        },
        "student_alone": {
            "accuracy": 0.6,
            "params": 100,
            "agreement": 0.6,
            "kl_to_teacher": 1.0,
            "ece": 0.2,
            "train_seconds": 1.0,
            "rows": 50,
        },
        "student_distilled": {
            "accuracy": 0.85,
            "params": 100,
            "size_bytes": 400,
            "latency_ms": 0.1,
            "throughput": 1000.0,
            "agreement": 0.9,
            "kl_to_teacher": 0.2,
            "ece": 0.05,
            "reliability": reliability,
            "train_seconds": 2.0,
            "rows": 500,
            "labeled_rows": 50,
            "transfer_rows": 450,
        },
        "gap_closed": (0.85 - 0.6) / 0.3,
        "retention": 0.85 / 0.9,
        "speedup": 10.0,
        "throughput_speedup": 10.0,
        "compression": 10.0,
        "loss": {"divergence": "forward_kl", "temperature": 2.0, "alpha": 0.9, "beta": 0.5},
        "history": {"teacher-0": history, "student-alone": history, "student-distilled": history},
        "seconds": 12.0,
    }
    if members > 1:
        metrics["student_from_single_teacher"] = {
            "accuracy": 0.8,
            "params": 100,
            "agreement": 0.85,
            "kl_to_teacher": 0.3,
            "ece": 0.06,
        }
    return metrics


def test_report_writes_markdown_html_and_plots(tmp_path):
    metrics = fake_metrics()
    report.write(report.classification_report(metrics), tmp_path, metrics)
    md = (tmp_path / "report.md").read_text()
    assert "| student distilled | 85.0 % |" in md and "94.4 %" in md and "0.83" in md
    page = (tmp_path / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 3
    assert "http://" not in page and "https://" not in page and "<script" not in page
    assert "a &lt;b&gt;toy&lt;/b&gt;" in page
    for name in ("learning_curves.png", "accuracy_vs_params.png", "reliability.png"):
        assert (tmp_path / name).read_bytes().startswith(b"\x89PNG")
    assert json.loads((tmp_path / "metrics.json").read_text())["recipe"] == "toy"


def test_ensemble_summary_compares_with_single_teacher():
    lines = report.classification_summary(fake_metrics(members=3))
    text = " ".join(lines)
    assert "3-model ensemble (90.0 %) is at least as accurate as its best member (88.0 %)" in text
    assert "from teacher 0 alone (+5.0 points)" in text


def test_report_states_each_students_batches_and_learning_rate():
    """The note on the baseline's training names each student's batches and learning rate when the run recorded
    them, and is still written for metrics of runs from before they were recorded."""
    metrics = fake_metrics()
    metrics["student_alone"] |= {"steps": 2625, "batch_size": 32, "lr": 0.01}
    metrics["student_distilled"] |= {"steps": 2580, "batch_size": 512, "lr": 0.03}
    notes = " ".join(report.classification_report(metrics).notes)
    assert "2,625 optimizer steps on the labeled rows (batches of 32, learning rate 0.01)" in notes
    assert "the distilled student's 2,580 (batches of 512, learning rate 0.03)" in notes
    older = " ".join(report.classification_report(fake_metrics()).notes)
    assert "optimizer steps on the labeled rows, at least as many" in older and "learning rate" not in older
