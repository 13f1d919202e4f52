"""Model cards in every saved student folder (the run's report, loss, data, config), and `distill push` to a local
stand-in of the Hugging Face Hub."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import yaml
from huggingface_hub import ModelCard

from _fake_hub import hub_app
from _fake_scoring import serve_app
from distill.recipes import RECIPES, run_recipe
from distill.stages import RunContext

TINY = {
    "recipe": "digits", "train_size": 200, "transfer_size": 50,
    "teacher": {"family": "mlp", "width": 16, "depth": 1}, "student": {"family": "mlp", "width": 8, "depth": 1},
    "teacher_train": {"epochs": 1, "batch_size": 64}, "student_train": {"epochs": 1, "batch_size": 64},
}  # fmt: skip


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    output = tmp_path_factory.mktemp("card") / "run"
    recipe = RECIPES["digits"]
    metrics = run_recipe(recipe, recipe.config.model_validate(TINY), RunContext(output))
    return output, metrics


def test_every_student_folder_has_a_card_with_the_report_and_the_config(run):
    output, metrics = run
    for folder in ("student", "models/student-distilled", "models/student-alone"):
        card = ModelCard.load(output / folder / "README.md")  # the Hub's own parser
        assert card.data.library_name == "distill" and {"knowledge-distillation", "digits"} <= set(card.data.tags)
        text = card.text
        assert "| model | test accuracy | parameters |" in text and "student distilled" in text
        assert f"{100 * metrics['student_distilled']['accuracy']:.1f} %" in text
        assert "T^2 x forward_kl" in text and "## Data" in text and "8x8 digits" in text
        config = yaml.safe_load(text.split("```yaml", 1)[1].split("```", 1)[0])
        assert config == yaml.safe_load((output / "config.yaml").read_text())
    assert not (output / "models" / "teacher-0" / "README.md").exists()  # teachers are not students


def push(*args, env=None, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "distill.cli", "push", *map(str, args)], capture_output=True,
                          text=True, timeout=120, env={**os.environ, **(env or {}), "OMP_NUM_THREADS": "1"}, cwd=cwd)  # fmt: skip


def test_push_uploads_the_student_folder_with_its_card(run):
    output, _ = run
    app = hub_app()
    with serve_app(app) as url:
        endpoint = url.removesuffix("/v1")
        done = push(output, "--repo", "me/tiny-digits", "--endpoint", endpoint, "--private", env={"HF_TOKEN": "hf_x"})
    assert done.returncode == 0, done.stderr
    assert app.state.repos == [{"repo": "me/tiny-digits", "private": True}] and app.state.tokens == {"Bearer hf_x"}
    sent = app.state.files["me/tiny-digits"]
    expected = {p.name: p.read_bytes() for p in (output / "student").iterdir()}
    assert sent == expected and "README.md" in sent and "model.safetensors" in sent
    assert "me/tiny-digits" in done.stdout


def test_push_errors_are_one_line(run, tmp_path):
    output, _ = run
    refusing = hub_app(refuse=True)
    with serve_app(refusing) as url:
        refused = push(output, "--repo", "me/x", "--endpoint", url.removesuffix("/v1"), env={"HF_TOKEN": "t"})
    cases = [
        (refused, "refused the upload to me/x"),
        (push(output, "--repo", "me/x", "--endpoint", "http://127.0.0.1:9", env={"HF_TOKEN": "t"}), "cannot reach"),
        (push(tmp_path, "--repo", "me/x", "--endpoint", "http://127.0.0.1:9"), "holds no saved model"),
        (push(output, "--repo", "me/x", env={"HF_TOKEN": ""}), "no Hub token in $HF_TOKEN"),
    ]
    for done, message in cases:
        lines = done.stderr.strip().splitlines()
        assert done.returncode == 2 and lines[-1].startswith("error: ") and message in lines[-1], done.stderr
