"""The transformer recipes end to end on a tiny random BERT and tiny data files (no downloads)."""

import json
import random

import pytest

from conftest import TINY_WORDS, tiny_bert
from distill import config as cfg
from distill.errors import DataError
from distill.recipes import RECIPES, run_recipe
from distill.recipes.sst2 import Sst2Config
from distill.recipes.stsb import StsbConfig
from distill.stages import RunContext
from distill.text_models import BiLSTMClassifier

STSB, SST2 = RECIPES["stsb"], RECIPES["sst2"]

POSITIVE = {"great", "good", "best", "love", "fun", "happy", "funny"}


def sentence(rng, n=6):
    return " ".join(rng.choice(TINY_WORDS[:-4]) for _ in range(n))


@pytest.fixture
def data_dir(tmp_path):
    rng = random.Random(0)
    root = tmp_path / "data"
    for folder in ("sst2", "stsb", "agnews"):
        (root / folder).mkdir(parents=True)

    def sst2_rows(n):
        rows = []
        for _ in range(n):
            text = sentence(rng, rng.randint(3, 8))
            rows.append(f"{text}\t{int(bool(POSITIVE & set(text.split())))}")
        return "sentence\tlabel\n" + "\n".join(rows) + "\n"

    (root / "sst2" / "train.tsv").write_text(sst2_rows(60))
    (root / "sst2" / "test.tsv").write_text(sst2_rows(20))
    meta = "0\tmain-captions\tMSRvid\t2012test\t0001\tnone\tnone"
    (root / "stsb" / "train.tsv").write_text(
        "\n".join(f"{meta}\t{sentence(rng)}\t{sentence(rng)}\t{rng.uniform(0, 5):.2f}" for _ in range(20)) + "\n"
    )
    header = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n"
    pairs = []
    for _ in range(30):
        a = sentence(rng)
        b = a if rng.random() < 0.5 else sentence(rng)
        pairs.append(f"{meta}\t{a}\t{b}\t{5.0 if a == b else rng.uniform(0, 3):.2f}")
    (root / "stsb" / "test.tsv").write_text(header + "\n".join(pairs) + "\n")
    (root / "agnews" / "dev.tsv").write_text("\n".join(f"{sentence(rng, 10)}\tWorld" for _ in range(20)) + "\n")
    return root


def test_stsb_recipe_trains_derived_students_and_reports_the_ablation(tmp_path, data_dir):
    tiny_bert(tmp_path / "teacher")
    config = cfg.load(
        StsbConfig,
        None,
        [
            f"teacher={tmp_path / 'teacher'}",
            "sample_size=40",
            "students=[3, 1]",
            "train.epochs=1",
            "train.batch_size=16",
        ],
    )
    out = tmp_path / "run"
    metrics = run_recipe(STSB, config, RunContext(out, store=tmp_path / "cache", datasets=data_dir))
    names = [s["name"] for s in metrics["students"]]
    assert names == [
        "3-layer",
        "1-layer",
        "3-layer every other",
        "3-layer top",
        "3-layer bottom",
        "3-layer random init",
    ]
    three = metrics["students"][0]
    assert (
        three["layers"] == [0, 2, 5]
        and metrics["students"][1]["layers"] == [5]
        and -1 <= three["spearman"] <= 1
        and three["params"] < metrics["teacher"]["params"]
    )
    assert three["throughput"] > 0 and "speedup" in three
    assert set(three["history"][0]) >= {"cosine:pool", "hidden_mse:transformer.encoder.layer.2", "loss"}
    assert (out / "students" / "3-layer" / "modules.json").exists()
    md = (out / "report.md").read_text()
    assert "| 3-layer random init |" in md and "Which layers a 3-layer student keeps matters" in md
    assert json.loads((out / "metrics.json").read_text())["recipe"] == "stsb"
    again = run_recipe(STSB, config, RunContext(out, store=tmp_path / "cache", datasets=data_dir, resume=True))
    assert [s["spearman"] for s in again["students"]] == pytest.approx([s["spearman"] for s in metrics["students"]])


def test_sst2_recipe_fine_tunes_caches_and_distills(tmp_path, data_dir):
    tiny_bert(tmp_path / "teacher")
    overrides = [
        f"teacher={tmp_path / 'teacher'}",
        "train_size=40",
        "transfer_size=60",
        "teacher_train.epochs=1",
        "student_train.epochs=1",
        "bilstm_train.epochs=2",
        "ablation_layers=[4, 5]",
    ]
    config = cfg.load(Sst2Config, None, overrides)
    out = tmp_path / "run"
    metrics = run_recipe(SST2, config, RunContext(out, store=tmp_path / "cache", datasets=data_dir))
    students = metrics["students"]
    assert set(students) == {
        "transformer-distilled",
        "transformer-alone",
        "transformer-ablation-distilled",
        "bilstm-distilled",
        "bilstm-alone",
    }
    assert students["transformer-distilled"]["layers"] == [0, 5]
    assert students["transformer-ablation-distilled"]["layers"] == [4, 5]
    assert {"kd", "ce"} <= set(students["transformer-distilled"]["history"][0])
    assert students["bilstm-distilled"]["params"] > 0 and students["bilstm-distilled"]["kind"] == "bilstm"
    for name in ("transformer-distilled", "bilstm-distilled"):
        assert students[name]["speedup"] > 0 and students[name]["latency_ms"] > 0
    teachers = list((tmp_path / "cache" / "sst2-teachers").iterdir())
    assert len(teachers) == 1 and (teachers[0] / "fine_tune.json").exists()  # fine-tuned once, cached
    from transformers import AutoModelForSequenceClassification

    exported = AutoModelForSequenceClassification.from_pretrained(out / "students" / "transformer-distilled")
    assert exported.config.num_hidden_layers == 2
    model, vocab = BiLSTMClassifier.load(out / "students" / "bilstm-distilled")
    assert len(vocab) > 5
    assert "transformer: distilled" in (out / "report.md").read_text()
    run_recipe(SST2, config, RunContext(tmp_path / "run2", store=tmp_path / "cache", datasets=data_dir))
    assert len(list((tmp_path / "cache" / "sst2-teachers").iterdir())) == 1  # the second run reused the teacher


def test_text_recipes_report_missing_files_and_columns(tmp_path, data_dir):
    tiny_bert(tmp_path / "teacher")
    (data_dir / "sst2" / "test.tsv").write_text("text\tlabel\nfine\t1\n")
    config = cfg.load(Sst2Config, None, [f"teacher={tmp_path / 'teacher'}", "train_size=10"])
    with pytest.raises(DataError, match="has no column 'sentence'"):
        run_recipe(SST2, config, RunContext(tmp_path / "out", store=tmp_path / "cache", datasets=data_dir))
    (data_dir / "stsb" / "test.tsv").unlink()
    config = cfg.load(StsbConfig, None, [f"teacher={tmp_path / 'teacher'}", "sample_size=10"])
    with pytest.raises(DataError, match="does not exist"):
        run_recipe(STSB, config, RunContext(tmp_path / "out2", store=tmp_path / "cache", datasets=data_dir))
