"""benchmarks/gpu/lm_scale.sh, the LLM-scale GPU benchmark, checked on a CPU at tiny sizes: every configuration
measured through distill's training loop (DDP and FSDP on two CPU processes), finite figures, the JSON and the
table; its time box, its deadline and its failures."""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu" / "lm_scale.sh"
CONFIGURATIONS = {
    "full fp32", "full fp32 + checkpointing", "full bf16", "full bf16 + checkpointing", "lora bf16",
    "lora bf16 + checkpointing", "full bf16, naive loss", "ddp bf16", "fsdp bf16",
}  # fmt: skip


def lm_scale():
    """benchmarks/gpu/lm_scale.py as a module (it is a script, not a package)."""
    spec = importlib.util.spec_from_file_location("lm_scale", ROOT / "benchmarks" / "gpu" / "lm_scale.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("lm_scale", module)  # its dataclasses look their module up there
    spec.loader.exec_module(sys.modules["lm_scale"])
    return sys.modules["lm_scale"]


def run_script(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHON": sys.executable}
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=600)


def test_the_script_measures_every_configuration_at_tiny_sizes_on_a_cpu(tmp_path):
    out = tmp_path / "gpu_lm_scale.json"
    done = run_script("--tiny", "--device", "cpu", "--processes", "2", "--warmup", "1", "--steps", "2",
                      "--out", str(out))  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(out.read_text())
    assert set(results["configurations"]) == CONFIGURATIONS
    assert results["torch"] == torch.__version__ and results["distributed"].startswith("2 processes")
    for name, figures in results["configurations"].items():
        assert figures["timed_steps"] == 2, name
        for key in ("tokens_per_s", "peak_memory_mb", "seconds"):
            assert math.isfinite(figures[key]) and figures[key] > 0, (name, key)
        trainable, total = figures["parameters"]["trainable"], figures["parameters"]["total"]
        assert (trainable < total) if figures["lora"] else (trainable == total), name
        assert figures["processes"] == (2 if name.startswith(("ddp", "fsdp")) else 1)
    configurations = results["configurations"]
    assert configurations["full fp32"]["teacher_dtype"] == "torch.float32"
    assert configurations["full bf16"]["teacher_dtype"] == "torch.bfloat16"  # teacher_precision null: the student's
    assert configurations["fsdp bf16"]["strategy"] == "fsdp" and configurations["full bf16, naive loss"]["naive"]
    assert len(results["comparisons"]) == 8
    assert all(math.isfinite(r["speed"]) and math.isfinite(r["memory"]) for r in results["comparisons"].values())
    assert "lora / full, bf16" in done.stdout and "fsdp bf16" in done.stdout  # the table


def test_a_configuration_stops_at_its_time_budget_and_ratios_pair_one_setting():
    module = lm_scale()
    clock = module.StepClock(torch.device("cpu"), warmup=2, budget=1.0)
    for moment in (10.0, 11.0, 11.5, 12.2):  # two warm-up steps, then timed steps ending at +0.5 s and +1.2 s
        clock.times.append(moment)
        if moment < 12.2:
            assert not clock.cancelled()
    assert clock.cancelled()
    assert clock.figures(tokens_per_step=100) == pytest.approx({"timed_steps": 2, "seconds": 1.2,
                                                                "tokens_per_s": 200 / 1.2})  # fmt: skip
    short = module.StepClock(torch.device("cpu"), warmup=2, budget=None)
    short.times += [1.0, 2.0]  # stopped before a timed step
    assert not short.cancelled()
    with pytest.raises(RuntimeError, match="only 2 steps ran; 2 were warm-up"):
        short.figures(100)
    figures = {
        "full bf16": {"tokens_per_s": 1000.0, "peak_memory_mb": 800.0},
        "lora bf16": {"tokens_per_s": 1250.0, "peak_memory_mb": 400.0},
        "full fp32": {"skipped": "time"},
    }
    assert module.comparisons(figures) == {"lora / full, bf16": {"speed": 1.25, "memory": 0.5}}


def test_a_run_out_of_time_skips_what_would_not_fit_and_fails(tmp_path, capsys):
    module = lm_scale()
    out = tmp_path / "late.json"
    assert module.main(["--tiny", "--device", "cpu", "--deadline", "0", "--out", str(out)]) == 1
    results = json.loads(out.read_text())
    assert all("skipped" in figures for figures in results["configurations"].values())
    assert results["distributed"].startswith("skipped") and results["comparisons"] == {}
    assert "nothing was measured in time" in capsys.readouterr().err


def test_the_shell_script_fails_where_there_is_no_gpu(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a GPU is here")
    done = run_script("--tiny", "--out", str(tmp_path / "x.json"))  # --device cuda by default
    assert done.returncode != 0 and "no CUDA device here" in done.stderr
    assert "lm_scale.sh: the benchmark failed" in done.stderr and not (tmp_path / "x.json").exists()


def test_a_failing_configuration_is_recorded_and_the_others_still_measured(tmp_path, monkeypatch):
    module = lm_scale()

    def measure(setting, teacher, size, args):
        if setting.lora:
            raise torch.OutOfMemoryError("CUDA out of memory")
        if setting.naive:
            raise ValueError("a broken step")
        return {"tokens_per_s": 1.0, "peak_memory_mb": 1.0}

    monkeypatch.setattr(module, "measure", measure)
    results = {"configurations": {}}
    args = argparse.Namespace(deadline=100.0, out=tmp_path / "r.json")
    module.run_settings(module.SETTINGS, None, "tiny", args, results, time.perf_counter())
    figures = results["configurations"]
    assert figures["lora bf16"] == {"error": "out of memory"}
    assert figures["full bf16, naive loss"] == {"error": "ValueError: a broken step"}
    assert figures["full fp32"] == {"tokens_per_s": 1.0, "peak_memory_mb": 1.0}
    assert json.loads(args.out.read_text()) == results  # written after each


def test_a_failed_or_late_torchrun_is_reported():
    module = lm_scale()
    python = [sys.executable, "-c"]
    assert module.torchrun([*python, "pass"], timeout=30) == ""
    failed = "import sys; print('torchrun noise', file=sys.stderr); print('[rank1]: ValueError: x', file=sys.stderr)"
    assert module.torchrun([*python, failed + "; sys.exit(1)"], timeout=30) == "[rank1]: ValueError: x"
    started = time.perf_counter()
    late = module.torchrun([*python, "import subprocess, sys; subprocess.run(['sleep', '60'])"], timeout=1)
    assert late == "did not end within the 1 s left of the deadline" and time.perf_counter() - started < 20
