"""One measured training run of benchmarks/vs_trl.py, in a fresh process with one torch thread: `distill` through
its library entry (`distill.train_lm.run_train_lm`, what `distill train-lm` runs) or TRL's `GKDTrainer`, on the
models and rows `_vs_trl_setup` saved.

Both sides: JSD beta 0.5 at temperature 1 (TRL's GKD loss; distill with alpha 1, the divergence alone), AdamW at a
constant learning rate with weight decay 0.01 and gradient clipping at 1, batches of `batch` rows in the same order
(the TRL side reads its rows in distill's first-epoch order, sequentially), on-policy with lmbda 1 and
`--new-tokens` tokens sampled at temperature 1 (top-k 0).

Measured: the time at the end of every optimizer step (steps per second over the steps after the first, which
allocates the optimizer's state), the loss of the first step (TRL's before its logging rounds it), the peak
resident memory of the whole process up to the end of training (`peak_rss_mb`) and the peak that training adds to
the memory held just before it starts (`training_rss_mb`: activations, logits, gradients, optimizer state;
/proc/self/clear_refs resets the peak there)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import torch

LR = 5e-5


def _status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


class Meter:
    """Step times, losses and memory of one training run; `begin` at the start of training, `step` at the end of
    each optimizer step, `finish` at the end."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.losses: list[float] = []
        self.memory: dict[str, float] = {}

    def begin(self) -> None:
        self.memory["peak_before_mb"] = _status_mb("VmHWM")
        Path("/proc/self/clear_refs").write_text("5")  # the peak (VmHWM) back to the current RSS
        self.memory["rss_before_mb"] = _status_mb("VmRSS")
        self.threads = torch.get_num_threads()
        self.cpu = sum(os.times()[:2])
        self.times = [time.perf_counter()]

    def step(self, loss: float | None = None) -> None:
        self.times.append(time.perf_counter())
        if loss is not None:
            self.losses.append(loss)

    def finish(self) -> None:
        peak = _status_mb("VmHWM")
        self.memory["training_rss_mb"] = peak - self.memory["rss_before_mb"]
        self.memory["peak_rss_mb"] = max(peak, self.memory["peak_before_mb"])
        self.cpu = sum(os.times()[:2]) - self.cpu

    def result(self, first_loss: float | None) -> dict[str, Any]:
        steps = [b - a for a, b in zip(self.times, self.times[1:])]
        timed = self.times[1:]  # from the end of the first step
        if len(timed) < 3:
            raise RuntimeError(f"{len(steps)} steps measured; give --steps 3 or more")
        rate = (len(timed) - 1) / (timed[-1] - timed[0])
        busy = self.cpu / (self.times[-1] - self.times[0])  # CPU seconds per second of training: about 1 on 1 thread
        return {"steps_per_second": rate, "step_seconds": steps, "first_loss": first_loss, "threads": self.threads,
                "cpu_per_wall": busy, **self.memory}  # fmt: skip


class DistillReporter:
    """`distill.progress.Reporter` feeding a `Meter` (train() reports its one stage, then every step)."""

    def __init__(self, meter: Meter) -> None:
        self.meter = meter

    def stage(self, name: str, total: int | None = None) -> None:
        self.meter.begin()

    def advance(self, steps: int = 1, **metrics: float) -> None:
        if steps:
            self.meter.step(metrics.get("loss"))

    def event(self, kind: str, **data: Any) -> None:
        pass

    def end(self) -> None:
        self.meter.finish()

    def cancelled(self) -> bool:
        return False


def run_distill(
    case: str, paths: dict[str, Path], steps: int, batch: int, new_tokens: int, precision: str, out: Path
) -> dict[str, Any]:
    """`run_train_lm` on `steps * batch` rows: the live teacher (`live`, `on_policy`) or its cache (`cache`)."""
    from distill.config import LossConfig, TrainConfig
    from distill.stages import RunContext
    from distill.train_lm import LMJobConfig, run_train_lm

    loss = LossConfig(divergence="jsd", beta=0.5, temperature=1.0, alpha=1.0, lmbda=1.0 if case == "on_policy" else 0.0,
                      max_new_tokens=new_tokens, sample_temperature=1.0)  # fmt: skip
    train = TrainConfig(epochs=1, batch_size=batch, lr=LR, weight_decay=0.01, schedule="constant", warmup=0.0,
                        grad_clip=1.0, checkpoint_every=0, seed=0, precision=precision)  # fmt: skip
    teacher = {"cache": paths["cache"]} if case == "cache" else {"teacher": str(paths["teacher"])}
    config = LMJobConfig(student=str(paths["student"]), data=paths["data"], max_length=length(paths), loss=loss,
                         train=train, **teacher)  # fmt: skip
    meter = Meter()
    metrics = run_train_lm(config, RunContext(output=out / "run", reporter=DistillReporter(meter)))
    if len(metrics["history"]) != 1:
        raise RuntimeError("expected one epoch")
    return meter.result(meter.losses[0] if meter.losses else None)


def length(paths: dict[str, Path]) -> int:
    """Tokens per row (prompt + completion), as the parent wrote them."""
    return int(json.loads(paths["shape"].read_text())["length"])


def run_trl(
    case: str, paths: dict[str, Path], steps: int, batch: int, new_tokens: int, precision: str, out: Path
) -> dict[str, Any]:
    """TRL's `GKDTrainer` on the same rows, read in distill's order: live teacher (`live`) or on-policy."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    tokenizer = AutoTokenizer.from_pretrained(paths["student"])
    order = json.loads(paths["order"].read_text())
    examples = [json.loads(line) for line in paths["data"].read_text().splitlines()]
    columns: dict[str, list[Any]] = {"input_ids": [], "prompt_length": []}
    for i in order:
        prompt = tokenizer(examples[i]["prompt"], add_special_tokens=False)["input_ids"]
        completion = tokenizer(examples[i]["completion"], add_special_tokens=False)["input_ids"]
        columns["input_ids"].append((prompt + completion)[: length(paths)])
        columns["prompt_length"].append(len(prompt))
    student = AutoModelForCausalLM.from_pretrained(paths["student"])
    teacher = AutoModelForCausalLM.from_pretrained(paths["teacher"])
    args = GKDConfig(output_dir=str(out / "trl"), per_device_train_batch_size=batch, max_steps=steps, learning_rate=LR,
                     lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.01, max_grad_norm=1.0,
                     lmbda=1.0 if case == "on_policy" else 0.0, beta=0.5, temperature=1.0, max_new_tokens=new_tokens,
                     train_sampling_strategy="sequential", logging_steps=steps, save_strategy="no", report_to=[],
                     disable_tqdm=True, use_cpu=True, dataloader_num_workers=0, dataloader_pin_memory=False,
                     seed=0, max_length=length(paths), bf16=precision == "bf16")  # fmt: skip
    meter = Meter()

    class Timing(TrainerCallback):  # type: ignore[misc]
        def on_train_begin(self, *_: Any, **__: Any) -> None:
            meter.begin()

        def on_step_end(self, *_: Any, **__: Any) -> None:
            meter.step()

        def on_train_end(self, *_: Any, **__: Any) -> None:
            meter.finish()

    trainer = GKDTrainer(model=student, teacher_model=teacher, args=args, train_dataset=Dataset.from_dict(columns),
                         data_collator=collate, processing_class=tokenizer, callbacks=[Timing()])  # fmt: skip
    first: list[float] = []
    compute_loss = trainer.compute_loss

    def recording(*a: Any, **k: Any) -> Any:  # the first step's loss, unrounded
        loss = compute_loss(*a, **k)
        if not first:
            first.append(float(loss.detach()))
        return loss

    trainer.compute_loss = recording  # type: ignore[method-assign]
    trainer.train()
    return meter.result(first[0] if first else None)


def collate(features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Rows as GKDTrainer takes them: input_ids, attention_mask, labels (-100 on the prompt; TRL shifts them), and
    the prompts left-padded for on-policy generation."""
    ids = torch.tensor([f["input_ids"] for f in features])  # (B, T), every row one length
    lengths = [int(f["prompt_length"]) for f in features]
    labels = ids.clone()  # (B, T)
    width = max(lengths)
    prompts = torch.zeros((len(features), width), dtype=torch.long)  # (B, P)
    prompt_mask = torch.zeros_like(prompts)  # (B, P)
    for b, n in enumerate(lengths):
        labels[b, :n] = -100
        prompts[b, width - n :] = ids[b, :n]
        prompt_mask[b, width - n :] = 1
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels, "prompts": prompts,
            "prompt_attention_mask": prompt_mask}  # fmt: skip
