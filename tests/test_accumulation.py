"""Gradient accumulation in the training loop (`train.grad_accum_steps`): micro-batches that add up to the batch
of all their rows, on the classifier and LM paths, short last groups, exact resume, on-policy batches, DDP."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from _steps import step_gradients
from conftest import blobs, mlp, run_distributed, tiny_gpt2
from distill.config import LossConfig, TrainConfig
from distill.data import concat
from distill.errors import DistillError
from distill.lm import on_policy_step
from distill.lm_data import Example, tokenize_examples
from distill.progress import NullReporter
from distill.teachers.local import LocalTeacher
from distill.train import train

HERE = Path(__file__).parent
EXAMPLES = [
    Example("q : the dog runs", "a : the dog plays"),
    Example("q : a great movie", "a : best film of the year"),
    Example("", "the cat is happy and the dog is sad"),
    Example("q : bad food", "a : very bad"),
    Example("q : the man", "a : a woman is riding a horse"),
    Example("q : i love", "a : this funny story"),
    Example("q : it was", "a : not"),
    Example("", "a dog runs fast on the street and a cat is eating food"),
]


def assert_same_steps(first, second):
    """Two runs applied the same gradients at every optimizer step. The first step starts from the same weights:
    its gradients agree to float32 rounding (1e-6). Later steps start from weights that differ by AdamW's answer
    to that rounding (it divides by sqrt(v): tiny gradients' rounding becomes visible), and agree to 1e-3 of each
    gradient's scale; a batch of other rows differs by its whole size."""
    assert len(first) == len(second) > 1
    for a, b in zip(first[0], second[0]):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6), (a - b).abs().max()
    for one, other in zip(first, second):
        for a, b in zip(one, other):
            assert torch.allclose(a, b, rtol=1e-3, atol=1e-3 * float(a.abs().max())), (a - b).abs().max()


def assert_same_history(first, second):
    assert [r["step"] for r in first] == [r["step"] for r in second]
    for one, other in zip(first, second):
        assert one == pytest.approx(other, rel=1e-4)


def test_four_micro_batches_of_two_rows_equal_one_batch_of_eight_on_the_classifier_path():
    """A transfer set: half the rows have no label, so micro-batches hold different numbers of labeled rows and
    `ce` must be weighted by labeled rows, `kd` by rows, for the sums to be the batch of eight's means."""
    data = concat(blobs(40, seed=1), blobs(40, seed=2).unlabeled())
    teacher = LocalTeacher(mlp(seed=5, width=32), 4)

    def run(batch_size, accumulate):
        config = TrainConfig(epochs=2, batch_size=batch_size, grad_accum_steps=accumulate, lr=1e-2, schedule="cosine")
        loss = LossConfig(temperature=2.0, alpha=0.5)
        return step_gradients(lambda: train(mlp(seed=3), data, config, teacher=teacher, loss=loss))

    (whole, eight), (accumulated, micro) = run(8, 1), run(2, 4)
    assert eight.steps == micro.steps == 2 * 10  # optimizer steps: 80 rows / 8 a step
    assert_same_steps(whole, accumulated)
    assert_same_history(eight.history, micro.history)
    for a, b in zip(eight.model.parameters(), micro.model.parameters()):
        assert torch.allclose(a, b, atol=1e-6)
    (_, two) = run(2, 1)
    assert any(not torch.allclose(a, b, atol=1e-3) for a, b in zip(eight.model.parameters(), two.model.parameters()))


def lm_student():
    student, _ = tiny_gpt2(seed=1)
    for module in student.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    return student


def test_four_micro_batches_of_two_rows_equal_one_batch_of_eight_on_the_lm_path():
    """Rows of different lengths: micro-batches score different numbers of tokens, and the chunked LM terms are
    means over scored tokens, so each micro-batch weighs by its tokens' share of the group's."""
    teacher, tokenizer = tiny_gpt2(layers=3, seed=2)
    data = tokenize_examples(tokenizer, EXAMPLES * 2)
    loss = LossConfig(temperature=2.0, alpha=0.5, chunk_size=8)

    def run(batch_size, accumulate, live=True):
        config = TrainConfig(epochs=2, batch_size=batch_size, grad_accum_steps=accumulate, lr=1e-2, schedule="cosine")
        source = LocalTeacher(teacher, len(tokenizer)) if live else None
        return step_gradients(lambda: train(lm_student(), data, config, teacher=source, loss=loss))

    (whole, eight), (accumulated, micro) = run(8, 1), run(2, 4)
    assert eight.steps == micro.steps == 4
    assert_same_steps(whole, accumulated)
    assert_same_history(eight.history, micro.history)
    assert set(micro.history[0]) >= {"kd", "ce"}
    (alone, _), (alone_accumulated, _) = run(8, 1, live=False), run(2, 4, live=False)  # fine-tuning: ce only
    assert_same_steps(alone, alone_accumulated)


def test_an_epoch_ends_with_a_shorter_accumulation_and_the_schedule_counts_optimizer_steps():
    data = blobs(44)  # groups of 2 x 4 = 8 rows: five full, then one of four rows (two micro-batches)
    batches = []
    original = data.batch
    data.batch = lambda index: batches.append(len(index)) or original(index)  # type: ignore[method-assign]
    config = TrainConfig(epochs=2, batch_size=2, grad_accum_steps=4, lr=1e-2, schedule="cosine", warmup=0.0)
    result = train(mlp(), data, config)
    assert result.steps == 2 * 6 and [r["step"] for r in result.history] == [6, 12]
    assert len(batches) == 2 * 22 and set(batches) == {2}  # every row, in micro-batches of two
    assert result.history[-1]["lr"] == pytest.approx(0.0, abs=1e-9)  # the cosine ran its 12 steps to zero


class CancelAfter(NullReporter):
    def __init__(self, steps):
        self.steps, self.seen = steps, 0

    def advance(self, steps=1, **metrics):
        self.seen += steps

    def cancelled(self):
        return self.seen >= self.steps


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_a_run_stopped_between_accumulated_steps_resumes_exactly(tmp_path, precision):
    """Checkpoints land between optimizer steps; with fp16 they keep the gradient scaler's state: inputs 30 times
    their size make the first scaled backward passes overflow in fp16, so the scale halves and those steps are
    skipped; a resumed run that started again from the initial scale would skip others."""
    data = blobs(200, seed=1)
    data.inputs *= 30
    teacher = LocalTeacher(mlp(seed=5, width=32), 4)

    def student():
        torch.manual_seed(11)
        return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 4))

    config = TrainConfig(epochs=3, batch_size=16, grad_accum_steps=3, lr=1e-2, checkpoint_every=4, seed=3,
                         precision=precision)  # fmt: skip
    loss = LossConfig(temperature=2.0, alpha=0.5)
    straight = train(student(), data, config, teacher=teacher, loss=loss)
    with pytest.raises(Exception, match="cancelled at step 7"):
        train(student(), data, config, teacher=teacher, loss=loss, checkpoint_dir=tmp_path, reporter=CancelAfter(7))
    saved = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert saved["state"]["step"] == 7 and saved["state"]["batch"] == 2  # 5 steps an epoch: epoch 2, after 2
    assert saved["scaler"]["scale"] < 2.0**16 if precision == "fp16" else saved["scaler"] == {}
    resumed = train(student(), data, config, teacher=teacher, loss=loss, checkpoint_dir=tmp_path, resume=True)
    assert resumed.steps == straight.steps == 15
    assert resumed.history == straight.history
    for a, b in zip(resumed.model.parameters(), straight.model.parameters()):
        assert torch.equal(a, b)


def test_precision_and_accumulation_are_part_of_the_checkpoint_signature(tmp_path):
    base = TrainConfig(epochs=1, batch_size=32)
    train(mlp(), blobs(64), base, checkpoint_dir=tmp_path)
    for change in ({"precision": "bf16"}, {"grad_accum_steps": 2}):
        with pytest.raises(DistillError, match="other data or settings"):
            train(mlp(), blobs(64), base.model_copy(update=change), checkpoint_dir=tmp_path, resume=True)
    # where to log is not: the finished run resumes as finished
    again = train(mlp(), blobs(64), base.model_copy(update={"report_to": ["tensorboard"]}), checkpoint_dir=tmp_path,
                  resume=True)  # fmt: skip
    assert again.steps == 2


def test_on_policy_micro_batches_each_draw_their_own_coin(monkeypatch):
    from distill import train as loop

    teacher, tokenizer = tiny_gpt2(layers=3, seed=2)
    data = tokenize_examples(tokenizer, [e for e in EXAMPLES if e.prompt])  # 6 rows with prompts
    sampled = []
    real = loop.student_samples
    monkeypatch.setattr(loop, "student_samples", lambda *a, **k: sampled.append(k["seed"]) or real(*a, **k))
    config = TrainConfig(epochs=2, batch_size=1, grad_accum_steps=3, lr=1e-3, seed=4)
    result = train(lm_student(), data, config, teacher=LocalTeacher(teacher, len(tokenizer)),
                   loss=LossConfig(lmbda=0.5, max_new_tokens=3, chunk_size=4))  # fmt: skip
    assert result.steps == 4
    coins = [m for m in range(12) if on_policy_step(4, m, 0.5)]  # micro-batch m = step x 3 + j
    assert 0 < len(coins) < 12 and sampled == [4 * 7919 + m for m in coins]
    assert set(result.history[0]) >= {"kd", "ce", "loss"}


def test_ddp_accumulation_synchronises_once_per_step_and_trains_one_model(tmp_path):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
               str(HERE / "_ddp_script.py"), str(tmp_path), "--accumulate", "2"]  # fmt: skip
    result = run_distributed(command, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["weights"] == pytest.approx(ranks[1]["weights"], abs=1e-6)  # the last micro-step synchronised
    assert ranks[0]["steps"] == 4 * (1000 // 50 // 2)  # groups of 2 x 25 rows, shared by two processes
    history = ranks[0]["history"]
    assert history[-1]["kd"] < history[0]["kd"] and history[-1]["test_accuracy"] > 0.9


def test_every_llm_setting_at_once_on_two_processes_under_ddp_and_fsdp(tmp_path):
    """bf16 student, float32 teacher, accumulation of 2 and activation checkpointing together on two processes
    (gloo, CPU): DDP (inner micro-steps under no_sync) and FSDP (gradient sync off on them, shards gathered for the
    checkpoint) train the same run."""
    histories = {}
    for strategy in ("ddp", "fsdp"):
        out = tmp_path / strategy
        out.mkdir()
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                   str(HERE / "_scale_script.py"), str(out), strategy]  # fmt: skip
        result = run_distributed(command, clean=None, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert result.returncode == 0, result.stderr[-3000:]
        first = json.loads((out / "rank0.json").read_text())
        assert first["steps"] == 3 * 3  # 24 rows in groups of 2 x 2, shared by two processes: 3 steps an epoch
        histories[strategy] = first["history"]
        saved = torch.load(out / "ckpt" / "checkpoint.pt", weights_only=True)
        assert saved["state"]["step"] == 9 and saved["signature"]["train"]["grad_accum_steps"] == 2
    losses = [record["loss"] for record in histories["ddp"]]
    assert losses[-1] < 0.85 * losses[0]
    assert [record["loss"] for record in histories["fsdp"]] == pytest.approx(losses, rel=1e-3)  # bf16 rounding
