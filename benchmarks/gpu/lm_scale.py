"""Distillation at LLM scale: tokens per second and peak memory of distill's own training step on NVIDIA GPUs.

A randomly initialised Llama-style pair (no downloads): a 1.1 B teacher (TinyLlama-1.1B's shape: 22 layers, 2048
wide, 32 heads, 4 key-value heads) and a 0.25 B student (16 layers, 1024 wide), vocabulary 32,000, on synthetic
token data (8 rows of 1,024 tokens a step, a 16-token prompt each). Every configuration trains a fresh student
through `distill.train.train` (a live `LocalTeacher`, forward KL + cross-entropy, AdamW), so the figures are the
product's, and differs from the first in one setting:

    full fp32                          the reference: float32 student and teacher, chunked loss (1,024 tokens)
    full fp32 + checkpointing          train.activation_checkpointing
    full bf16 / + checkpointing        train.precision bf16 (the teacher's weights cast to bf16 too)
    lora bf16 / + checkpointing        student.lora (r 16, alpha 32, all linear layers): only the adapters train
    full bf16, naive loss              loss.chunk_size 0: the (tokens x vocabulary) logits in full
    ddp bf16 / fsdp bf16               with two GPUs or more: one torchrun over all of them (8 rows per GPU)

Each runs `--warmup` steps, then `--steps` timed steps (the device synchronised at each), stopped early when its
timed steps pass `--budget` seconds; configurations that would not fit in what is left of `--deadline` are skipped
with a note. Tokens per second count every input token of the timed steps (all processes'). Peak memory is
`torch.cuda.max_memory_allocated` over the configuration (reset before it; it includes the resident teacher, whose
share `teacher_mb` is given too); on a CPU (the test's `--tiny --device cpu`) it is the process's peak RSS, which
is never reset. The JSON (written after every configuration) has the device, the versions, every configuration's
figures and the ratios of the pairs that differ in one setting; a table is printed.

    bash benchmarks/gpu/lm_scale.sh                  # the full sizes on cuda, in under 8 minutes
    python benchmarks/gpu/lm_scale.py --tiny --device cpu --processes 2 --out /tmp/lm_scale.json
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from distill import distributed
from distill.config import LoraSpec, LossConfig, TrainConfig
from distill.lm_data import LMDataset
from distill.lora import parameter_counts, trained_model, with_lora
from distill.progress import Cancelled, NullReporter
from distill.teachers.local import LocalTeacher
from distill.train import train

RESULTS = Path(__file__).resolve().parents[1] / "results" / "gpu_lm_scale.json"
PROMPT = 16  # tokens of each synthetic row's prompt; the rest is its completion (scored)
SHAPES: dict[str, dict[str, Any]] = {
    "full": {
        "teacher": {"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22,
                    "num_attention_heads": 32, "num_key_value_heads": 4},
        "student": {"hidden_size": 1024, "intermediate_size": 2816, "num_hidden_layers": 16,
                    "num_attention_heads": 16, "num_key_value_heads": 4},
        "vocab": 32_000, "batch": 8, "length": 1024, "chunk_size": 1024,
    },
    "tiny": {
        "teacher": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                    "num_attention_heads": 4, "num_key_value_heads": 2},
        "student": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                    "num_attention_heads": 4, "num_key_value_heads": 2},
        "vocab": 512, "batch": 2, "length": 48, "chunk_size": 32,
    },
}  # fmt: skip
LORA = LoraSpec(r=16, alpha=32.0, dropout=0.0, target_modules="all-linear")


@dataclass(frozen=True)
class Setting:
    """One configuration: what it changes of the student's step."""

    name: str
    precision: str = "fp32"
    checkpointing: bool = False
    lora: bool = False
    naive: bool = False  # loss.chunk_size 0
    strategy: str = "ddp"


SETTINGS = [  # float32 ones first: a bf16 run casts the shared teacher's weights in place
    Setting("full fp32"),
    Setting("full fp32 + checkpointing", checkpointing=True),
    Setting("full bf16", "bf16"),
    Setting("full bf16 + checkpointing", "bf16", checkpointing=True),
    Setting("lora bf16", "bf16", lora=True),
    Setting("lora bf16 + checkpointing", "bf16", checkpointing=True, lora=True),
    Setting("full bf16, naive loss", "bf16", naive=True),
]
DISTRIBUTED = [Setting("ddp bf16", "bf16"), Setting("fsdp bf16", "bf16", strategy="fsdp")]
PAIRS = [  # (what, changed, reference): ratios changed / reference
    ("bf16 / fp32", "full bf16", "full fp32"),
    ("checkpointing / none, fp32", "full fp32 + checkpointing", "full fp32"),
    ("checkpointing / none, bf16", "full bf16 + checkpointing", "full bf16"),
    ("lora / full, bf16", "lora bf16", "full bf16"),
    ("lora / full, bf16 + checkpointing", "lora bf16 + checkpointing", "full bf16 + checkpointing"),
    ("naive / chunked loss, bf16", "full bf16, naive loss", "full bf16"),
    ("ddp / one GPU, bf16", "ddp bf16", "full bf16"),
    ("fsdp / one GPU, bf16", "fsdp bf16", "full bf16"),
]


def llama(shape: dict[str, Any], vocab: int, device: torch.device, seed: int) -> Any:
    """A randomly initialised LlamaForCausalLM, built on `device` (float32)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab, max_position_embeddings=4096, tie_word_embeddings=False, **shape)
    torch.manual_seed(seed)
    with torch.device(device):
        return LlamaForCausalLM(config)  # attention: transformers' default, recorded as `attention`


def synthetic_data(shape: dict[str, Any], rows: int, seed: int) -> LMDataset:
    """`rows` random sequences of `length` tokens (ids 1 and up; 0 pads), each with a PROMPT-token prompt."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, shape["vocab"], (rows, shape["length"]), generator=generator)  # (R, T)
    return LMDataset(ids.tolist(), [PROMPT] * rows, pad_id=0)


class StepClock(NullReporter):
    """Times the steps of a `train` run, synchronising the device at each, and stops the run once its timed steps
    (those after `warmup`, at least one) pass `budget` seconds (None: never; under torchrun only process 0 would
    know)."""

    def __init__(self, device: torch.device, warmup: int, budget: float | None) -> None:
        self.device, self.warmup, self.budget = device, warmup, budget
        self.times: list[float] = []  # perf_counter() after each step

    def advance(self, steps: int = 1, **metrics: float) -> None:
        if steps > 0:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.times.append(time.perf_counter())

    def cancelled(self) -> bool:
        timed = self.times[self.warmup - 1 :]  # the end of the warm-up, then each timed step
        return self.budget is not None and len(timed) > 1 and timed[-1] - timed[0] > self.budget

    def figures(self, tokens_per_step: int) -> dict[str, float]:
        """Timed steps, their seconds and tokens per second."""
        timed = len(self.times) - self.warmup
        if timed < 1:
            raise RuntimeError(f"only {len(self.times)} steps ran; {self.warmup} were warm-up")
        seconds = self.times[-1] - self.times[self.warmup - 1]
        return {"timed_steps": timed, "seconds": seconds, "tokens_per_s": tokens_per_step * timed / seconds}


def memory_mb(device: torch.device) -> float:
    """Peak memory since the last reset: CUDA's allocated bytes, or the process's peak RSS on a CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10  # kB on Linux


def measure(setting: Setting, teacher: LocalTeacher, size: str, args: argparse.Namespace) -> dict[str, Any]:
    """Train a fresh student under `setting` for the warm-up and timed steps; its figures."""
    shape, device, world = SHAPES[size], torch.device(args.device), distributed.world_size()
    student: Any = llama(shape["student"], shape["vocab"], device, seed=1)
    if setting.lora:
        student = trained_model(with_lora(student, LORA, seed=1))  # as train-lm does
    data = synthetic_data(shape, shape["batch"] * world * (args.warmup + args.steps), seed=2)
    config = TrainConfig(epochs=1, batch_size=shape["batch"], lr=1e-4, schedule="constant", warmup=0.0,
                         checkpoint_every=0, device=args.device, strategy=setting.strategy,
                         precision=setting.precision, activation_checkpointing=setting.checkpointing)  # fmt: skip
    loss = LossConfig(temperature=1.0, alpha=0.5, chunk_size=0 if setting.naive else shape["chunk_size"])
    clock = StepClock(device, args.warmup, args.budget if world == 1 else None)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    record: dict[str, Any] = {"parameters": parameter_counts(student)}
    try:
        train(student, data, config, teacher=teacher, loss=loss, reporter=clock, name=setting.name)
    except Cancelled:
        record["note"] = f"stopped after {args.budget} s of timed steps"
    if distributed.rank() != 0:  # process 0 times and reports
        return {}
    record.update(clock.figures(shape["batch"] * shape["length"] * world))
    weights = list(teacher.model.parameters())
    record.update(peak_memory_mb=memory_mb(device), teacher_dtype=str(weights[0].dtype),
                  teacher_mb=sum(p.numel() * p.element_size() for p in weights) / 2**20)  # fmt: skip
    record.update(asdict(setting), processes=world, attention=str(student.config._attn_implementation))
    return record


def run_settings(settings: list[Setting], teacher: LocalTeacher, size: str, args: argparse.Namespace,
                 results: dict[str, Any], started: float) -> None:  # fmt: skip
    """Measure each setting into `results["configurations"]`, skipping those that would pass the deadline (each
    is assumed to take as long as the longest so far); the JSON is rewritten after each."""
    longest = 0.0
    for setting in settings:
        left = args.deadline - (time.perf_counter() - started)
        if left < 1.5 * longest:
            results["configurations"][setting.name] = {"skipped": f"{left:.0f} s left of the deadline"}
            continue
        began = time.perf_counter()
        try:
            results["configurations"][setting.name] = measure(setting, teacher, size, args)
        except torch.OutOfMemoryError:
            results["configurations"][setting.name] = {"error": "out of memory"}
        except Exception as error:  # recorded, the others still measured; the run then exits 1
            traceback.print_exc()
            results["configurations"][setting.name] = {"error": f"{type(error).__name__}: {error}"}
        longest = max(longest, time.perf_counter() - began)
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        write(results, args.out)


def run_distributed(size: str, args: argparse.Namespace, results: dict[str, Any], started: float) -> None:
    """DDP and FSDP over `args.processes` processes (default: every GPU found), in one torchrun run with what is
    left of the deadline; a note when there are fewer than two."""
    cuda = args.device.startswith("cuda")
    processes = args.processes if args.processes is not None else torch.cuda.device_count() if cuda else 1
    if processes < 2:
        found = f"{torch.cuda.device_count()} GPU found" if cuda else "a CPU run (--processes 2 for two)"
        results["distributed"] = f"skipped: {found}; DDP and FSDP need two processes or more"
        return
    left = args.deadline - (time.perf_counter() - started)
    if left < 60:  # starting the processes and building their teachers takes most of a minute at full size
        results["distributed"] = f"skipped: {left:.0f} s left of the deadline"
        return
    results["distributed"] = f"{processes} processes (peak memory: process 0's)"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}",
               __file__, "--worker", "--device", args.device, "--warmup", str(args.warmup), "--steps",
               str(args.steps), *(["--tiny"] if size == "tiny" else [])]  # fmt: skip
    with tempfile.TemporaryDirectory() as folder:
        part = Path(folder) / "part.json"
        failure = torchrun([*command, "--out", str(part)], timeout=left)
        measured = json.loads(part.read_text()) if part.is_file() else {}
    for setting in DISTRIBUTED:
        results["configurations"][setting.name] = measured.get(setting.name) or {"error": failure or "not measured"}
    write(results, args.out)


def torchrun(command: list[str], timeout: float) -> str:
    """Run a torchrun command in a process group of its own (all of it killed when it passes `timeout` seconds);
    "" when it succeeded, else what its processes said of their failure."""
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)  # fmt: skip
    try:
        _, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)  # torchrun and the processes it started
        process.communicate()
        return f"did not end within the {timeout:.0f} s left of the deadline"
    return "" if process.returncode == 0 else "\n".join(_worker_lines(stderr)[-12:])


def _worker_lines(stderr: str) -> list[str]:
    """What the processes said of their failure ("[rank1]: ..." lines), else torchrun's own lines."""
    lines = stderr.splitlines()
    return [line for line in lines if line.startswith("[rank")] or lines


def worker(args: argparse.Namespace) -> int:
    """One process of the torchrun run (`--worker`): the teacher, then each distributed setting; process 0 writes
    the figures measured so far to `--out` after each."""
    distributed.join_torchrun()
    size = "tiny" if args.tiny else "full"
    shape, device = SHAPES[size], torch.device(args.device)
    teacher = LocalTeacher(llama(shape["teacher"], shape["vocab"], device, seed=0), shape["vocab"], device=device)
    measured = {}
    for setting in DISTRIBUTED:
        measured[setting.name] = measure(setting, teacher, size, args)
        if distributed.rank() == 0:
            write(measured, args.out)
        gc.collect()
    distributed.leave()
    return 0


def comparisons(configurations: dict[str, Any]) -> dict[str, dict[str, float]]:
    """For each pair that differs in one setting (both measured): its speed and peak-memory ratios."""
    out = {}
    for what, changed, reference in PAIRS:
        a, b = configurations.get(changed, {}), configurations.get(reference, {})
        if "tokens_per_s" in a and "tokens_per_s" in b:
            out[what] = {"speed": a["tokens_per_s"] / b["tokens_per_s"],
                         "memory": a["peak_memory_mb"] / b["peak_memory_mb"]}  # fmt: skip
    return out


def header(args: argparse.Namespace, size: str) -> dict[str, Any]:
    """What the figures were measured on and with."""
    import peft
    import transformers

    cuda = args.device.startswith("cuda")
    return {
        "device": torch.cuda.get_device_name(torch.device(args.device)) if cuda else platform.processor() or "cpu",
        "torch": torch.__version__, "cuda": torch.version.cuda, "transformers": transformers.__version__,
        "peft": peft.__version__, "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
        "memory": "torch.cuda.max_memory_allocated" if cuda else "peak RSS of the process (never reset)",
        "size": size, "shapes": SHAPES[size], "lora": LORA.model_dump(), "warmup": args.warmup,
        "steps": args.steps, "budget_s": args.budget, "deadline_s": args.deadline, "configurations": {},
    }  # fmt: skip


def write(results: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=2))
    os.replace(tmp, path)


def table(results: dict[str, Any]) -> str:
    """The configurations and the comparisons as text tables."""
    lines = [f"{results['device']}, torch {results['torch']}, {results['size']} sizes "
             f"(teacher {results.get('teacher_parameters', 0):,} parameters)", "",
             f"{'configuration':<28} {'tokens/s':>10} {'peak MB':>10} {'trainable':>13}  note"]  # fmt: skip
    for name, figures in results["configurations"].items():
        if "tokens_per_s" not in figures:
            lines.append(f"{name:<28} {'':>10} {'':>10} {'':>13}  {figures.get('skipped') or figures.get('error')}")
            continue
        lines.append(f"{name:<28} {figures['tokens_per_s']:>10,.0f} {figures['peak_memory_mb']:>10,.0f} "
                     f"{figures['parameters']['trainable']:>13,}  {figures.get('note', '')}")  # fmt: skip
    lines += ["", f"{'ratio':<36} {'speed':>7} {'memory':>7}"]
    for what, ratio in results["comparisons"].items():
        lines.append(f"{what:<36} {ratio['speed']:>7.2f} {ratio['memory']:>7.2f}")
    lines.append(f"distributed: {results['distributed']}")
    return "\n".join(lines)


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny models and data (the CPU check)")
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (at least 1)")
    parser.add_argument("--steps", type=int, default=6, help="timed steps of each configuration")
    parser.add_argument("--budget", type=float, default=30.0, help="seconds of timed steps per configuration")
    parser.add_argument("--deadline", type=float, default=400.0, help="seconds for the whole run")
    parser.add_argument("--processes", type=int, default=None, help="DDP/FSDP processes (default: the GPUs)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="the JSON written")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)  # a process of the torchrun run
    args = parser.parse_args(argv)
    if args.warmup < 1 or args.steps < 1:
        parser.error("--warmup and --steps must be at least 1")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("no CUDA device here: give --device cpu (with --tiny) to check the script on a CPU")
    return args


def main(argv: list[str] | None = None) -> int:
    """The whole run; exit status 1 when a configuration failed (out of memory, a failed torchrun) or when no
    comparison could be measured before the deadline."""
    args = parse(argv)
    if args.worker:
        return worker(args)
    started, size = time.perf_counter(), "tiny" if args.tiny else "full"
    shape, device = SHAPES[size], torch.device(args.device)
    results = header(args, size)
    teacher = LocalTeacher(llama(shape["teacher"], shape["vocab"], device, seed=0), shape["vocab"], device=device)
    results["teacher_parameters"] = parameter_counts(teacher.model)["total"]
    run_settings(SETTINGS, teacher, size, args, results, started)
    del teacher  # the GPUs free for the torchrun processes
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    run_distributed(size, args, results, started)
    results["comparisons"] = comparisons(results["configurations"])
    results["seconds"] = time.perf_counter() - started
    write(results, args.out)
    print(table(results))
    failed = [name for name, figures in results["configurations"].items() if "error" in figures]
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    if not results["comparisons"]:
        print("nothing was measured in time: raise --deadline", file=sys.stderr)
    return 1 if failed or not results["comparisons"] else 0


if __name__ == "__main__":
    sys.exit(main())
