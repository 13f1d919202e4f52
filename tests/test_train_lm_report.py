"""distill train-lm's report and model card: the student against its live teacher on the held-out data, the LoRA
settings, the config; paths in the config file (the student given with its settings included) relative to the
file, a Hub data set id kept as it is."""

import json

import yaml
from huggingface_hub import ModelCard

from conftest import tiny_gpt2
from distill.config import load
from distill.train_lm import LMJobConfig
from test_cli import distill_cli
from test_lm_cli import ROWS

JOB = {
    "student": {"model": "student", "lora": {"r": 4, "alpha": 8.0, "dropout": 0.0, "target_modules": ["c_attn"]}},
    "teacher": "teacher", "data": "train.jsonl", "eval_data": "eval.jsonl", "max_length": 32,
    "train": {"epochs": 1, "batch_size": 4, "lr": 0.003, "grad_accum_steps": 2, "precision": "bf16"},
    "loss": {"chunk_size": 16, "temperature": 1.0},
}  # fmt: skip


def test_train_lm_writes_a_report_and_a_card_with_the_teacher_and_the_student(tmp_path):
    files = tmp_path / "files"
    tiny_gpt2(files / "teacher", layers=3, seed=2)
    tiny_gpt2(files / "student", layers=1, seed=1)
    (files / "train.jsonl").write_text("\n".join(json.dumps(r) for r in ROWS * 4) + "\n")
    (files / "eval.jsonl").write_text("\n".join(json.dumps(r) for r in ROWS) + "\n")
    (files / "job.yaml").write_text(yaml.safe_dump(JOB))
    done = distill_cli("train-lm", "--config", files / "job.yaml", "--output", tmp_path / "run", cwd=tmp_path)
    assert done.returncode == 0, done.stderr  # run from another folder: every path resolved against the file
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    rows = metrics["eval_models"]
    assert set(rows) == {"teacher", "student"} and metrics["eval"].items() <= rows["student"].items()
    assert rows["teacher"]["params"] > rows["student"]["params"] > 0 and rows["student"]["tokens_per_second"] > 0
    card = ModelCard.load(tmp_path / "run" / "student" / "README.md")
    assert card.data.library_name == "transformers" and card.data.pipeline_tag == "text-generation"
    assert "lora" in card.data.tags and card.data.base_model is None  # a local folder is no Hub name
    for text in (card.text, (tmp_path / "run" / "report.md").read_text()):
        assert "Student vs teacher (held-out data)" in text
        assert f"| student | {rows['student']['perplexity']:.2f} |" in text
        assert f"| teacher | {rows['teacher']['perplexity']:.2f} |" in text
        assert "batch 4 x 2 accumulated" in text and "precision bf16" in text and "LoRA:" in text
    config = yaml.safe_load(card.text.split("```yaml", 1)[1].split("```", 1)[0])
    assert config["student"]["model"] == str(files / "student") and config["train"]["grad_accum_steps"] == 2


def test_a_hub_data_set_id_in_a_config_file_is_kept_and_paths_next_to_it_resolved(tmp_path):
    (tmp_path / "local.jsonl").write_text("{}\n")
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump({"student": {"model": "org/student"}, "data": "openai/gsm8k:main:train",
                                    "eval_data": "local.jsonl"}))  # fmt: skip
    config = load(LMJobConfig, path)
    assert str(config.data) == "openai/gsm8k:main:train" and config.eval_data == tmp_path / "local.jsonl"
    assert config.student_spec().model == "org/student"  # a Hub name, not a folder here: kept
