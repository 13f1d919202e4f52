import pytest

from distill import config as cfg
from distill.errors import DistillError
from distill.recipes.lm import LMConfig
from distill.recipes.mnist1d import Mnist1dConfig
from distill.train_arrays import ArraysJobConfig


def test_overrides_parse_yaml_values():
    data = cfg.apply_overrides({"loss": {"alpha": 0.5}}, ["loss.temperature=4", "teachers=3", "x.y.z=[1, 2]", "s=abc"])
    assert data == {"loss": {"alpha": 0.5, "temperature": 4}, "teachers": 3, "x": {"y": {"z": [1, 2]}}, "s": "abc"}
    with pytest.raises(DistillError, match="key=value"):
        cfg.apply_overrides({}, ["novalue"])


def test_load_yaml_with_overrides_and_relative_paths(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("data:\n  train: train.csv\nteacher: models/t\ntrain:\n  epochs: 3\n")
    job = cfg.load(ArraysJobConfig, path, ["train.lr=0.01"])
    assert job.train.epochs == 3 and job.train.lr == 0.01
    assert job.data.train == tmp_path / "train.csv"
    assert job.teacher == [tmp_path / "models/t"]


@pytest.mark.parametrize(
    "text, message",
    [
        ("data: [1, 2\n", "not valid YAML at line"),
        ("- 1\n- 2\n", "must hold a mapping"),
        ("data:\n  train: a.csv\ntrain:\n  lr: -1\n", "train.lr: Input should be greater than 0"),
        ("data:\n  train: a.csv\ntrian:\n  lr: 1\n", "trian: Extra inputs are not permitted"),
        ("train:\n  lr: 1\n", "data: Field required"),
    ],
)
def test_bad_config_files(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(DistillError, match=message):
        cfg.load(ArraysJobConfig, path)


def test_missing_config_file(tmp_path):
    with pytest.raises(DistillError, match="does not exist"):
        cfg.load(ArraysJobConfig, tmp_path / "nope.yaml")


def test_run_config_rejects_unknown_recipe_and_values():
    with pytest.raises(DistillError, match="recipe"):
        cfg.load(Mnist1dConfig, None, ["recipe=imagenet"])
    with pytest.raises(DistillError, match="loss.alpha"):
        cfg.load(Mnist1dConfig, None, ["loss.alpha=2"])
    with pytest.raises(DistillError, match="teachers"):
        cfg.load(Mnist1dConfig, None, ["teachers=0"])


def test_dump_round_trips():
    run = cfg.load(Mnist1dConfig, None, ["teachers=2", "loss.temperature=3"])
    import yaml

    assert Mnist1dConfig.model_validate(yaml.safe_load(cfg.dump(run))) == run


def test_example_recipe_files_are_valid():
    from pathlib import Path

    root = Path(__file__).parent.parent / "recipes"
    run = cfg.load(Mnist1dConfig, root / "mnist1d-ensemble.yaml")
    assert run.teachers == 5
    job = cfg.load(ArraysJobConfig, root / "own-arrays.yaml", ["teacher=null"])
    assert job.teacher == [] and job.data.train == root / "../data/train.csv"
    first_line = (root / "own-arrays.yaml").read_text().splitlines()[0]
    assert first_line.startswith("# distill train --config")
    from distill.train_lm import LMJobConfig

    lm = cfg.load(LMJobConfig, root / "llm-one-node.yaml")  # Hub ids stay ids; nothing is looked up to validate
    assert (
        lm.student_spec().model == "meta-llama/Llama-3.2-1B-Instruct"
        and lm.teacher == "meta-llama/Llama-3.1-8B-Instruct"
    )
    assert str(lm.data) == "HuggingFaceH4/ultrachat_200k:default:train_sft"
    assert (lm.train.precision, lm.train.grad_accum_steps, lm.train.activation_checkpointing) == ("bf16", 8, True)
    lora = cfg.load(LMJobConfig, root / "llm-one-node.yaml", ["student.lora.r=64"])
    assert lora.student_spec().lora is not None and lora.student_spec().lora.r == 64


def test_a_section_given_in_part_keeps_the_rest_of_its_recipe_default():
    from distill.recipes.sst2 import Sst2Config

    sst2 = cfg.load(Sst2Config, None, ["student_train.epochs=5", "loss.alpha=0.7"])
    assert sst2.student_train.epochs == 5
    assert sst2.student_train.lr == Sst2Config().student_train.lr == 1e-4  # not TrainConfig's 3e-3
    assert sst2.student_train.schedule == "cosine" and sst2.student_train.batch_size == 32
    assert sst2.loss.alpha == 0.7 and sst2.loss.temperature == Sst2Config().loss.temperature
    lm = cfg.load(LMConfig, None, ["teacher.layers=1"])
    assert lm.teacher == {**LMConfig().teacher, "layers": 1}
