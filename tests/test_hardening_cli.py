"""Hardening of the configs, the data loading, the checkpoints and the CLI (issue 12): absurd parameters, data that
does not fit what it claims, files that are not UTF-8 or nest too deeply, crafted .npz archives and checkpoints and
damaged cached data sets are refused (or regenerated) with one line, `error: ...`, exit status 2, before anything is
allocated or run."""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any, get_args

import numpy as np
import pytest
import torch
from pydantic import BaseModel, ValidationError

from conftest import blobs, mlp, tiny_bert, tiny_gpt2
from distill import config as cfg
from distill import models
from distill.data import (
    TextDataset,
    infer_num_classes,
    json_lines,
    load_arrays,
    physical_memory,
    read_json,
    tokenize,
)
from distill.errors import DataError, DistillError
from distill.lm_data import read_examples
from distill.recipes import mnist1d
from distill.recipes.lm import LMConfig
from distill.recipes.mnist1d import Mnist1dConfig
from distill.recipes.reasoning import ReasoningConfig
from distill.recipes.sst2 import Sst2Config
from distill.recipes.stsb import StsbConfig
from distill.train import train
from distill.train_arrays import ArraysJobConfig, DataSpec
from distill.train_lm import LMJobConfig

HUGE = str(10**30)


def distill_cli(*args: Any, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "DISTILL_CACHE": str(cwd / ".cache"), "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "distill.cli", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=300,
        env=env,
    )


def assert_one_line_error(result: subprocess.CompletedProcess, fragment: str) -> None:
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and errors[0] == lines[-1], result.stderr  # progress bars may come before it
    assert fragment in errors[0], errors[0]
    assert "Traceback" not in result.stderr


# ----------------------------------------------------------------------------------------------------------------
# Bounds: every config model, one place, the CLI and the service alike
# ----------------------------------------------------------------------------------------------------------------

CACHE_BUILD = ["cache", "build", "--teacher", "t", "--data", "d.jsonl", "--out", "c"]


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["run", "--temperature", "inf"], "loss.temperature: Input should be a finite number"),
        (["run", "--temperature", "nan"], "loss.temperature: Input should be a finite number"),
        (["run", "--epochs", HUGE], "epochs: Input should be less than or equal to 100000"),
        (["run", "--seed", HUGE], "seed: Input should be less than or equal to 4294967295"),
        (["run", "--transfer-size", str(10**12)], "transfer_size: Input should be less than or equal to 100000000"),
        (
            ["run", "--student-width", "65536", "--set", "student.depth=64"],
            "student_width: a mlp of width 65,536 and depth 64 would hold about 274,877,906,944 parameters",
        ),
        (  # within the bound at depth 1, not at the recipe's default depth of 2
            ["run", "--student-width", "12000"],
            "student_width: a mlp of width 12,000 and depth 2 would hold about 288,000,000 parameters",
        ),
        (
            ["run", "--recipe", "lm", "--set", "student.width=65536", "--set", "student.heads=1"],
            "student: a GPT-2 of 2 layers, 65,536 wide, over 2,048 tokens would hold about",
        ),
        (["run", "--recipe", "reasoning", "--set", "teacher.heads=3"], "width 128 is not divisible by heads 3"),
        (["run", "--recipe", "sst2", "--set", "max_length=100000"], "max_length: Input should be less than or equal"),
        ([*CACHE_BUILD, "--temperature", "inf"], "--temperature: Input should be a finite number"),
        ([*CACHE_BUILD, "--top-k", "100000"], "--top-k: Input should be less than or equal to 4096"),
        ([*CACHE_BUILD, "--max-length", HUGE], "--max-length: Input should be less than or equal to 32768"),
    ],
)
def test_run_and_cache_options_out_of_bounds_get_one_line(tmp_path, args, fragment):
    assert_one_line_error(distill_cli(*args, cwd=tmp_path), fragment)


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        ([f"train.seed={HUGE}"], "train.seed: Input should be less than or equal to 4294967295"),
        ([f"train.epochs={HUGE}"], "train.epochs: Input should be less than or equal to 100000"),
        (["train.batch_size=1000000000"], "train.batch_size: Input should be less than or equal to 1048576"),
        (["student.width=65536", "student.depth=64"], "student: a mlp of width 65,536 and depth 64 would hold"),
        (["data.num_classes=1000000"], "data.num_classes: Input should be less than or equal to 100000"),
        (["loss.temperature=.inf"], "loss.temperature: Input should be a finite number"),
        (["data.input_shape=[0, 8]"], "data.input_shape.0: Input should be greater than or equal to 1"),
    ],
)
def test_train_job_out_of_bounds_gets_one_line(tmp_path, overrides, fragment):
    (tmp_path / "job.yaml").write_text("data:\n  train: train.csv\n")
    sets = [arg for item in overrides for arg in ("--set", item)]
    assert_one_line_error(distill_cli("train", "--config", "job.yaml", *sets, cwd=tmp_path), fragment)


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        ([f"max_length={10**12}"], "max_length: Input should be less than or equal to 1048576"),
        (["loss.temperature=.nan"], "loss.temperature: Input should be a finite number"),
        ([f"train.seed={HUGE}"], "train.seed: Input should be less than or equal to 4294967295"),
    ],
)
def test_train_lm_job_out_of_bounds_gets_one_line(tmp_path, overrides, fragment):
    (tmp_path / "job.yaml").write_text("student: nowhere\ndata: d.jsonl\n")
    sets = [arg for item in overrides for arg in ("--set", item)]
    assert_one_line_error(distill_cli("train-lm", "--config", "job.yaml", *sets, cwd=tmp_path), fragment)


def _config_models() -> list[tuple[type[BaseModel], dict[str, Any]]]:
    """Every config model with the least it needs to be valid."""
    models_and_bases: list[tuple[type[BaseModel], dict[str, Any]]] = [
        (cfg.FeatureLoss, {"kind": "cosine", "student": "a", "teacher": "b"}),
        (cfg.LossConfig, {}),
        (cfg.TrainConfig, {}),
        (cfg.ModelSpec, {}),
        (Mnist1dConfig, {}),
        (StsbConfig, {}),
        (Sst2Config, {}),
        (LMJobConfig, {"student": "s", "data": "d.jsonl"}),
        (LMConfig, {}),
        (DataSpec, {"train": "a.csv"}),
        (ArraysJobConfig, {"data": {"train": "a.csv"}}),
        (cfg.CacheBuildOptions, {}),
        (ReasoningConfig, {}),
    ]
    try:
        from distill.service import kinds
    except ModuleNotFoundError:  # without the [service] extra
        return models_and_bases
    return [
        *models_and_bases,
        (kinds.CacheBuildJobConfig, {"teacher": "t", "data": "d.jsonl"}),
        (kinds.GenerateJobConfig, {"api": "a", "model": "m", "prompts": "p.jsonl"}),
        (kinds.EvaluateJobConfig, {"student": "s", "data": "d.csv"}),
    ]


def _mentions(annotation: Any, kind: type) -> bool:
    return annotation is kind or any(_mentions(a, kind) for a in get_args(annotation))


def test_every_number_in_every_config_is_bounded_and_finite():
    """No int field (alone or in a list) takes 10^30 and no float field takes inf or nan, in any config model."""
    checked = 0
    for model, base in _config_models():
        model.model_validate(base)
        for name, field in model.model_fields.items():
            annotation = field.annotation
            listed = _mentions(annotation, list)
            if _mentions(annotation, int) and not _mentions(annotation, bool) and "dict" not in str(annotation):
                values: list[Any] = [[10**30] if listed else 10**30]
            elif _mentions(annotation, float):
                values = [float("inf"), float("nan")]
            else:
                continue
            for value in values:
                with pytest.raises(ValidationError) as refused:
                    model.model_validate({**base, name: value})
                assert refused.value.errors()[0]["loc"][0] == name, (model.__name__, name, value)
                checked += 1
    assert checked > 100


@pytest.mark.parametrize(
    "model, data",
    [
        (StsbConfig, {"max_length": 513}),
        (Sst2Config, {"max_length": 7}),
        (LMConfig, {"vocab_size": 299}),
        (LMConfig, {"max_length": 600}),
        (LMConfig, {"vocab_size": 1000, "top_k": 1001}),
        (LMJobConfig, {"student": "s", "data": "d", "max_length": 7}),
        (ReasoningConfig, {"max_length": 31}),
        (ReasoningConfig, {"steps": [7]}),
        (Mnist1dConfig, {"train_size": 9}),
        (Mnist1dConfig, {"teachers": 33}),
        (cfg.CacheBuildOptions, {"top_k": 4097}),
        (cfg.CacheBuildOptions, {"batch_size": 1025}),
        (cfg.TrainConfig, {"warmup": 1.0}),
    ],
)
def test_a_field_narrowing_a_shared_bound_keeps_its_narrower_range(model, data):
    with pytest.raises(ValidationError):
        model.model_validate(data)


def test_narrowed_ranges_still_take_their_ends():
    assert cfg.ModelSpec(head=0).head == 0 and cfg.LossConfig(chunk_size=0).chunk_size == 0
    assert cfg.TrainConfig(seed=cfg.MAX_SEED).seed == 2**32 - 1
    assert StsbConfig(max_length=512).max_length == 512


@pytest.mark.parametrize(
    "size, fragment",
    [
        ({"layers": 2, "width": 128, "heads": 2, "depth": 3}, "exactly the keys layers, width and heads"),
        ({"layers": 2, "width": 128, "heads": 3}, "width 128 is not divisible by heads 3"),
        ({"layers": 0, "width": 128, "heads": 2}, "layers must be between 1 and 256, not 0"),
        ({"layers": 2, "width": 100_000, "heads": 2}, "width must be between 1 and 65,536"),
        ({"layers": 2, "width": 100, "heads": 3}, "width 100 is not divisible by heads 3"),
        ({"layers": 256, "width": 8192, "heads": 8}, "would hold about 206,"),
    ],
)
def test_gpt2_sizes_are_bounded(size, fragment):
    for model in (LMConfig, ReasoningConfig):
        with pytest.raises(ValidationError, match=fragment):
            model.model_validate({"teacher": size})


def test_a_gpt2_size_given_in_part_keeps_the_recipes_other_keys():
    for model in (LMConfig, ReasoningConfig):
        given = model.model_validate({"teacher": {"layers": 2, "width": 64}}).teacher
        assert given == {**model().teacher, "layers": 2, "width": 64}


def test_built_in_models_are_bounded_before_anything_is_allocated(tmp_path):
    with pytest.raises(ValidationError, match="about 274,877,906,944 parameters in its hidden layers"):
        cfg.ModelSpec(width=65_536, depth=64)
    with pytest.raises(ValidationError, match="cnn2d of width 8,192 and depth 1 would hold about 603,979,776"):
        cfg.ModelSpec(family="cnn2d", width=8192, depth=1)
    spec = cfg.ModelSpec(width=16_384, depth=1)  # within the hidden-layer bound, but not with 100,000 inputs
    with pytest.raises(DistillError, match="would hold 1,638,"):
        models.build(spec, (100_000,), 10)
    small = cfg.ModelSpec(width=4, depth=1)
    models.save(models.build(small, (3,), 2), tmp_path / "m", small, (3,), 2)
    meta = json.loads((tmp_path / "m" / "model.json").read_text())
    (tmp_path / "m" / "model.json").write_text(json.dumps({**meta, "num_classes": 10**12}))
    with pytest.raises(DistillError, match="is malformed: 1,000,000,000,000 classes"):
        models.load(tmp_path / "m")


def test_service_job_configs_share_the_bounds():
    kinds = pytest.importorskip("distill.service.kinds")
    base = {"teacher": "t", "data": "d.jsonl"}
    for bad in ({"temperature": float("inf")}, {"top_k": 4097}, {"max_length": 10**12}):
        with pytest.raises(ValidationError):
            kinds.CacheBuildJobConfig.model_validate({**base, **bad})
    generate = {"api": "a", "model": "m", "prompts": "p.jsonl"}
    for bad in ({"seed": 10**30}, {"max_tokens": 10**12}, {"limit": 10**12}, {"timeout": float("nan")}):
        with pytest.raises(ValidationError):
            kinds.GenerateJobConfig.model_validate({**generate, **bad})
    assert kinds.GenerateJobConfig.model_validate({**generate, "seed": cfg.MAX_SEED}).seed == cfg.MAX_SEED


def test_the_largest_seed_trains_and_generates():
    result = train(mlp(), blobs(64), cfg.TrainConfig(epochs=1, batch_size=16, seed=cfg.MAX_SEED))
    assert result.steps == 4
    signals = mnist1d.transfer_inputs(10, seed=cfg.MAX_SEED, store=None, workers=1)
    assert signals.shape == (10, 40)


# ----------------------------------------------------------------------------------------------------------------
# Data that does not fit what it claims
# ----------------------------------------------------------------------------------------------------------------


def crafted_npz(path: Path, shape: tuple[int, ...]) -> Path:
    """An .npz whose x.npy declares `shape` (float64) but holds no data: a few hundred bytes."""
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<f8", "fortran_order": False, "shape": shape})
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("x.npy", header.getvalue())  # the magic string and the header, no data
        archive.writestr("y.npy", header.getvalue())
    return path


@pytest.mark.parametrize(
    "name, content, fragment",
    [
        ("train.csv", b"a,label\n1,0\n", "train.csv has 1 row (1 labeled): holding out test_fraction 0.2 leaves 0"),
        ("train.csv", b"a,label\n1,0\n2,1000000000000\n3,1\n", "label 1000000000000 at row 1 of"),
        ("train.csv", b"a,label\n1,0\n\xff\xfe,1\n", "train.csv is not UTF-8 text (byte 12, line 3"),
        ("train.npz", None, "would take 1,600,000,000,000 bytes once loaded, over the limit of"),
    ],
)
def test_train_data_that_cannot_be_used_gets_one_line(tmp_path, name, content, fragment):
    if content is None:
        crafted_npz(tmp_path / name, (10**11,))
        assert (tmp_path / name).stat().st_size < 500
    else:
        (tmp_path / name).write_bytes(content)
    (tmp_path / "job.yaml").write_text(f"data:\n  train: {name}\ntrain:\n  epochs: 1\n")
    assert_one_line_error(distill_cli("train", "--config", "job.yaml", cwd=tmp_path), fragment)


def test_class_count_and_split_checks():
    labels = torch.tensor([0, 3, -100, 99_999])
    assert infer_num_classes(labels, "x") == 100_000
    with pytest.raises(DataError, match="label 100000 at row 2 of x would make 100,001 classes"):
        infer_num_classes(torch.tensor([0, 1, 100_000]), "x")
    with pytest.raises(DataError, match="x has no labeled rows"):
        infer_num_classes(torch.full((3,), -100), "x")


def test_npz_is_checked_from_its_headers(tmp_path):
    with pytest.raises(DataError, match=f"over the limit of {physical_memory():,} bytes"):
        load_arrays(crafted_npz(tmp_path / "big.npz", (10**11, 1)))
    np.savez(tmp_path / "ok.npz", x=np.ones((4, 3)), y=np.arange(4))
    assert load_arrays(tmp_path / "ok.npz")[0].shape == (4, 3)
    with pytest.raises(DataError, match="would take 128 bytes once loaded, over the limit of 100 bytes"):
        load_arrays(tmp_path / "ok.npz", max_bytes=100)


def test_not_utf8_names_the_exact_byte_across_blocks(tmp_path):
    block = 1 << 20
    content = b"x" * (block - 1) + "é".encode() + b"\n" + b"\xff\n"  # é straddles the first block's end
    path = tmp_path / "t.txt"
    path.write_bytes(content)
    with pytest.raises(DataError, match=f"is not UTF-8 text \\(byte {block + 2:,}, line 2: invalid start byte\\)"):
        read_examples(path)
    (tmp_path / "cut.jsonl").write_bytes(b'{"text": "a"}\n{"text": "\xe2\x82')  # a character cut off at the end
    with pytest.raises(DataError, match="cut.jsonl is not UTF-8 text \\(byte 24, line 2: unexpected end of data"):
        list(json_lines(tmp_path / "cut.jsonl"))


def test_json_nested_too_deeply_is_a_data_error(tmp_path):
    deep = "[" * 100_000 + "]" * 100_000
    (tmp_path / "d.jsonl").write_text('{"text": "a"}\n' + deep + "\n")
    with pytest.raises(DataError, match="line 2 of .*d.jsonl holds JSON nested too deeply to read"):
        list(json_lines(tmp_path / "d.jsonl"))
    (tmp_path / "m.json").write_text(deep)
    with pytest.raises(DataError, match="m.json holds JSON nested too deeply to read"):
        read_json(tmp_path / "m.json")
    (tmp_path / "h.json").write_text("[1, 2]")
    with pytest.raises(DataError, match="is not what distill wrote there \\(an object with history, seconds\\)"):
        read_json(tmp_path / "h.json", ("history", "seconds"))


@pytest.mark.parametrize(
    "content, fragment",
    [
        (b'{"text": "fine"}\n{"text": "\xff"}\n', "d.jsonl is not UTF-8 text (byte 27, line 2: invalid start byte)"),
        (("[" * 100_000 + "]" * 100_000 + "\n").encode(), "line 1 of d.jsonl holds JSON nested too deeply to read"),
    ],
)
def test_train_lm_jsonl_that_cannot_be_read_gets_one_line(tmp_path, content, fragment):
    tiny_gpt2(tmp_path / "student", layers=1)
    (tmp_path / "d.jsonl").write_bytes(content)
    (tmp_path / "job.yaml").write_text("student: student\ndata: d.jsonl\n")
    assert_one_line_error(distill_cli("train-lm", "--config", "job.yaml", cwd=tmp_path), fragment)


@pytest.mark.parametrize(
    "content, fragment",
    [
        (b'{"recipe": "\xc3("}', "metrics.json is not UTF-8 text (byte 12, line 1: invalid continuation byte)"),
        (("[" * 100_000 + "]" * 100_000).encode(), "metrics.json holds JSON nested too deeply to read"),
        (b"[1, 2]", "metrics.json is not the metrics of a distill run"),
    ],
)
def test_report_of_unreadable_metrics_gets_one_line(tmp_path, content, fragment):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.json").write_bytes(content)
    assert_one_line_error(distill_cli("report", "run", cwd=tmp_path), fragment)


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints: tensors and plain data only
# ----------------------------------------------------------------------------------------------------------------


class MarkerOnLoad:
    """Unpickling this creates `marker`: what a crafted checkpoint could do instead (run any code)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.touch, (self.marker,))


def craft_checkpoint(path: Path, marker: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"signature": MarkerOnLoad(marker), "model": {}, "optimizer": {}, "scheduler": {}, "state": {}}, path)


def test_checkpoints_hold_plain_data_and_load_with_weights_only(tmp_path):
    data, config = blobs(64), cfg.TrainConfig(epochs=2, batch_size=16, checkpoint_every=3)

    def evaluate(model):  # numpy scalars, as metrics often are
        return {"accuracy": np.float32(0.5), "rows": np.int64(64), "loss": np.float64(1.25)}

    straight = train(mlp(), data, config, evaluate=evaluate)
    train(mlp(), data, config, evaluate=evaluate, checkpoint_dir=tmp_path)
    saved = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert saved["state"]["history"][-1]["accuracy"] == 0.5 and type(saved["state"]["history"][-1]["rows"]) is int
    assert saved["optimizer"]["state"] and saved["scheduler"]["last_epoch"] == 8
    resumed = train(mlp(), data, config, evaluate=evaluate, checkpoint_dir=tmp_path, resume=True)
    assert resumed.history == straight.history


def test_crafted_checkpoint_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "marker"
    craft_checkpoint(tmp_path / "ckpt" / "checkpoint.pt", marker)
    config = cfg.TrainConfig(epochs=1, batch_size=16)
    with pytest.raises(DistillError, match="is not a distill checkpoint of tensors and plain data"):
        train(mlp(), blobs(64), config, checkpoint_dir=tmp_path / "ckpt", resume=True)
    assert not marker.exists()
    torch.save([1, 2], tmp_path / "ckpt" / "checkpoint.pt")  # plain data, but not a checkpoint
    with pytest.raises(DistillError, match="it is not a distill checkpoint; delete it"):
        train(mlp(), blobs(64), config, checkpoint_dir=tmp_path / "ckpt", resume=True)
    craft_checkpoint(tmp_path / "ckpt" / "checkpoint.pt", marker)
    torch.load(tmp_path / "ckpt" / "checkpoint.pt", weights_only=False)  # the craft works where pickles are run
    assert marker.exists()


def write_csv(path: Path, rows: int = 60) -> None:
    rng = np.random.default_rng(0)
    lines = ["f0,f1,f2,label"] + [f"{a},{b},{c},{rng.integers(0, 3)}" for a, b, c in rng.normal(size=(rows, 3))]
    path.write_text("\n".join(lines) + "\n")


def test_resume_with_a_damaged_history_or_a_crafted_checkpoint_gets_one_line(tmp_path):
    write_csv(tmp_path / "train.csv")
    plain = "data:\n  train: train.csv\ntrain:\n  epochs: 1\n  batch_size: 16\n"
    (tmp_path / "plain.yaml").write_text(plain)
    assert distill_cli("train", "--config", "plain.yaml", "--output", "t", cwd=tmp_path).returncode == 0
    (tmp_path / "job.yaml").write_text(plain + "teacher: t/model\nstudent: {family: mlp, width: 8, depth: 1}\n")
    assert distill_cli("train", "--config", "job.yaml", "--output", "run", cwd=tmp_path).returncode == 0

    history = tmp_path / "run" / "models" / "student-distilled" / "history.json"
    resume = ("train", "--config", "job.yaml", "--output", "run", "--resume")
    prefix = b'{"history": [], "seconds": "'
    history.write_bytes(prefix + b'\xff"}')
    assert_one_line_error(distill_cli(*resume, cwd=tmp_path), f"history.json is not UTF-8 text (byte {len(prefix)}, ")
    history.write_text("[" * 100_000 + "]" * 100_000)
    assert_one_line_error(distill_cli(*resume, cwd=tmp_path), "history.json holds JSON nested too deeply to read")

    history.unlink()  # the stage runs again, from its checkpoint: a crafted one
    marker = tmp_path / "marker"
    craft_checkpoint(tmp_path / "run" / "checkpoints" / "student-distilled" / "checkpoint.pt", marker)
    assert_one_line_error(distill_cli(*resume, cwd=tmp_path), "is not a distill checkpoint of tensors and plain data")
    assert not marker.exists()


# ----------------------------------------------------------------------------------------------------------------
# Cached data sets carry a checksum, verified on use
# ----------------------------------------------------------------------------------------------------------------


def test_a_damaged_cached_transfer_set_is_detected_and_replaced(tmp_path):
    first = mnist1d.transfer_inputs(200, seed=3, store=tmp_path, workers=1)
    [path] = (tmp_path / "mnist1d").glob("transfer-*.npy")
    checksum = Path(f"{path}.sha256")
    assert checksum.read_text().strip() == hashlib.sha256(path.read_bytes()).hexdigest()
    kept = path.read_bytes()

    damaged = bytearray(kept)
    damaged[-5] ^= 0xFF  # one byte of the last signal: still a valid .npy of the right shape
    path.write_bytes(bytes(damaged))
    assert not np.array_equal(np.load(path), first)
    again = mnist1d.transfer_inputs(200, seed=3, store=tmp_path, workers=1)
    assert np.array_equal(again, first)  # regenerated, not read from the damaged file
    assert path.read_bytes() == kept  # and the file replaced

    checksum.unlink()  # a file without its checksum (an older version's) is regenerated too
    path.write_bytes(bytes(damaged))
    assert np.array_equal(mnist1d.transfer_inputs(200, seed=3, store=tmp_path, workers=1), first)
    assert path.read_bytes() == kept and checksum.is_file()


def test_a_damaged_cached_fine_tuned_teacher_is_fine_tuned_again(tmp_path):
    from distill.progress import NULL
    from distill.recipes.sst2 import fine_tune_teacher

    _, tokenizer = tiny_bert(tmp_path / "teacher", layers=1)
    texts = ["the movie was great", "a dull film", "i love this story", "the plot was bad"] * 4
    labels = torch.tensor([1, 0, 1, 0] * 4)
    data = TextDataset(tokenize(tokenizer, texts, 16), labels)
    config = Sst2Config(teacher=str(tmp_path / "teacher"), teacher_train=cfg.TrainConfig(epochs=1, batch_size=8))
    cache = tmp_path / "cache"
    _, directory, info = fine_tune_teacher(config, tokenizer, data, data, cache, NULL)
    weights = directory / "model.safetensors"
    kept = weights.read_bytes()
    assert "model.safetensors" in info["files"]

    stamp = (directory / "fine_tune.json").stat().st_mtime_ns
    fine_tune_teacher(config, tokenizer, data, data, cache, NULL)  # intact: reused as it is
    assert (directory / "fine_tune.json").stat().st_mtime_ns == stamp

    damaged = bytearray(kept)
    damaged[-3] ^= 0xFF
    weights.write_bytes(bytes(damaged))
    _, again, _ = fine_tune_teacher(config, tokenizer, data, data, cache, NULL)
    assert again == directory and weights.read_bytes() == kept  # fine-tuned again, to the same weights
