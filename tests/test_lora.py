"""LoRA students (distill.lora, train_lm's `student: {model, lora}`): only the adapters train, the saved student is
the merged model (and the adapter beside it), on-policy sampling, exact resume, DDP, and the refusals."""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import run_distributed, tiny_gpt2, tiny_tokenizer
from distill.config import ConfigError, LoraSpec, resolve
from distill.errors import DistillError
from distill.lm import student_samples
from distill.lm_data import read_examples, tokenize_examples
from distill.lora import trained_model, with_lora
from distill.progress import Cancelled, NullReporter
from distill.stages import RunContext
from distill.train_lm import LMJobConfig, run_train_lm

ROWS = [
    {"prompt": "q : the dog runs", "completion": "a : the dog plays"},
    {"prompt": "q : a great movie", "completion": "a : best film of the year"},
    {"prompt": "q : bad food", "completion": "a : very bad"},
    {"prompt": "q : the man plays guitar", "completion": "a : the woman plays guitar"},
]
LORA = {"r": 4, "alpha": 8.0, "dropout": 0.0, "target_modules": ["c_attn", "c_fc"]}


@pytest.fixture
def files(tmp_path):
    tiny_gpt2(tmp_path / "teacher", layers=2, seed=2)
    tiny_gpt2(tmp_path / "student", layers=1, seed=1)
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(r) for r in ROWS * 4) + "\n")
    return tmp_path


def lm_job(tmp_path, lora=LORA, **extra) -> LMJobConfig:
    raw = {
        "student": {"model": str(tmp_path / "student"), "lora": lora},
        "teacher": str(tmp_path / "teacher"),
        "data": str(tmp_path / "train.jsonl"),
        "eval_data": str(tmp_path / "train.jsonl"),
        "max_length": 32,
        "train": {"epochs": 2, "batch_size": 4, "lr": 0.01, "checkpoint_every": 2},
        "loss": {"chunk_size": 16, "temperature": 1.0},
    }
    return resolve(LMJobConfig, raw, [f"{k}={v}" for k, v in extra.items()])


def test_a_lora_student_trains_merges_and_reloads(files):
    before = AutoModelForCausalLM.from_pretrained(files / "student").state_dict()
    metrics = run_train_lm(lm_job(files), RunContext(files / "run"))
    adapters = 4 * (32 + 3 * 32) + 4 * (
        32 + 4 * 32
    )  # r x (in + out): A and B of c_attn (32 -> 96) and c_fc (32 -> 128)
    assert metrics["parameters"] == {"trainable": adapters, "total": metrics["params"] + adapters}
    assert {"kd", "ce"} <= set(metrics["history"][-1]) and metrics["eval"]["perplexity"] > 1
    directory = files / "run" / "student"
    merged = AutoModelForCausalLM.from_pretrained(directory)  # an ordinary causal LM folder: the merged weights
    after = merged.state_dict()
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert changed == {"transformer.h.0.attn.c_attn.weight", "transformer.h.0.mlp.c_fc.weight"}  # frozen elsewhere
    assert (directory / "tokenizer.json").is_file() and metrics["adapter_bytes"] > 0
    assert adapter_computes_the_merged_student(files / "student", directory)


def adapter_computes_the_merged_student(original, student) -> bool:
    """Whether the adapter saved beside a merged student, put on the original student, computes what it does."""
    from peft import PeftModel

    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(original), student / "adapter")
    merged = AutoModelForCausalLM.from_pretrained(student)
    ids = torch.tensor([[3, 9, 12, 5, 20]])
    with torch.no_grad():
        return torch.allclose(adapted(input_ids=ids).logits, merged(input_ids=ids).logits, atol=1e-5)


def test_the_string_and_the_mapping_forms_name_the_same_student(files):
    plain = resolve(LMJobConfig, {"student": "student", "data": "train.jsonl"})
    mapped = resolve(LMJobConfig, {"student": {"model": "student"}, "data": "train.jsonl"})
    assert plain.student_spec() == mapped.student_spec() and mapped.student_spec().lora is None
    assert lm_job(files).student_spec().lora == LoraSpec(**LORA)
    with pytest.raises(ConfigError, match="student"):
        resolve(LMJobConfig, {"student": {"lora": LORA}, "data": "train.jsonl"})  # no model


def test_target_modules_the_student_lacks_are_refused_with_its_layer_names(files):
    model, _ = tiny_gpt2(layers=1)
    with pytest.raises(DistillError, match=r"q_proj.*named c_attn, c_fc, c_proj, lm_head"):
        with_lora(model, LoraSpec(target_modules=["q_proj"]))


def test_without_peft_a_lora_student_asks_for_the_extra(monkeypatch):
    model, _ = tiny_gpt2(layers=1)
    monkeypatch.setitem(sys.modules, "peft", None)  # import peft raises ImportError
    with pytest.raises(DistillError, match=r"LoRA students need peft.*distill\[hf\]"):
        with_lora(model, LoraSpec())


def tiny_llama(directory):
    """A tiny random Llama (base_model_prefix "model", as most LLMs) over the tiny tokenizer, saved."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = tiny_tokenizer(directory)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(directory)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_on_policy_sampling_works_with_the_adapters(files, family):
    if family == "llama":
        tiny_llama(files / "student")
    model = AutoModelForCausalLM.from_pretrained(files / "student")
    tokenizer = tiny_tokenizer()
    peft_model = with_lora(model, LoraSpec(r=2))
    data = tokenize_examples(tokenizer, read_examples(files / "train.jsonl", tokenizer), 32)
    batch = data.batch(torch.arange(4))
    for sampler in (peft_model, trained_model(peft_model)):  # the peft model, and the model the loop trains
        sampled = student_samples(sampler, batch, max_new_tokens=5, temperature=1.0, seed=3,
                                  pad_id=tokenizer.pad_token_id, eos_id=tokenizer.eos_token_id)  # fmt: skip
        prompts = batch["prompt_lengths"]
        assert torch.equal(sampled["prompt_lengths"], prompts)
        for b in range(4):  # each row: its prompt, then 1 to 5 sampled tokens, the scored positions
            n = int(prompts[b])
            assert torch.equal(sampled["inputs"]["input_ids"][b, :n], batch["inputs"]["input_ids"][b, :n])
            assert 1 <= int(sampled["kd_mask"][b].sum()) <= 5
    if family == "llama":
        tiny_llama(files / "teacher")
    lora = LORA if family == "gpt2" else {**LORA, "target_modules": "all-linear"}
    job = lm_job(files, lora=lora, **{"loss.lmbda": 1.0, "loss.max_new_tokens": 4})
    metrics = run_train_lm(job, RunContext(files / "gkd"))
    assert "kd" in metrics["history"][0] and "ce" not in metrics["history"][0]  # every batch on-policy
    assert metrics["eval"]["perplexity"] > 1
    adapter = files / "gkd" / "student" / "adapter" / "adapter_model.safetensors"
    from safetensors.torch import load_file

    trained_b = [w for name, w in load_file(adapter).items() if "lora_B" in name]
    assert trained_b and all(bool(w.abs().sum() > 0) for w in trained_b)  # B starts at zero: the adapters learned


def test_with_activation_checkpointing_the_adapters_train_as_without(files):
    plain = run_train_lm(lm_job(files), RunContext(files / "plain"))
    recomputed = run_train_lm(lm_job(files, **{"train.activation_checkpointing": True}), RunContext(files / "ac"))
    for record, expected in zip(recomputed["history"], plain["history"], strict=True):
        assert record == pytest.approx(expected, rel=1e-4)  # the gradients reach the adapters through recomputation
    assert recomputed["history"][-1]["loss"] < recomputed["history"][0]["loss"]


class CancelAt(NullReporter):
    """Cancels the run when it has advanced `steps` steps (as a user stopping a job)."""

    def __init__(self, steps: int) -> None:
        self.steps, self.done = steps, 0

    def advance(self, steps: int = 1, **metrics: float) -> None:
        self.done += steps

    def cancelled(self) -> bool:
        return self.done >= self.steps


def test_a_stopped_lora_run_resumes_to_the_same_student(files):
    straight = run_train_lm(lm_job(files), RunContext(files / "a"))
    with pytest.raises(Cancelled):
        run_train_lm(lm_job(files), RunContext(files / "b", reporter=CancelAt(3)))
    saved = torch.load(files / "b" / "checkpoints" / "checkpoint.pt", weights_only=True)
    assert saved["state"]["step"] == 3
    lora_keys = [key for key in saved["model"] if ".lora_" in key]
    assert len(lora_keys) == 4 and len(saved["optimizer"]["state"]) == 4  # A and B of 2 layers: all it trains
    resumed = run_train_lm(lm_job(files), RunContext(files / "b", resume=True))
    assert resumed["eval"] == pytest.approx(straight["eval"], rel=1e-5)
    for record, expected in zip(resumed["history"], straight["history"], strict=True):
        assert record == pytest.approx(expected, rel=1e-5)
    with pytest.raises(DistillError, match="written for the student"):  # another adapter cannot continue it
        run_train_lm(lm_job(files, lora={**LORA, "r": 8}), RunContext(files / "b", resume=True))


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_a_lora_student_trains_under_torchrun(files, strategy):
    (files / "job.yaml").write_text(
        "student: {model: student, lora: {r: 4, alpha: 8, dropout: 0.0}}\nteacher: teacher\ndata: train.jsonl\n"
        f"max_length: 32\ntrain: {{epochs: 1, batch_size: 4, lr: 0.01, checkpoint_every: 2, strategy: {strategy}}}\n"
        "loss: {chunk_size: 16, temperature: 1.0, lmbda: 0.5, max_new_tokens: 3}\n"
    )
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
               "-m", "distill.cli", "train-lm", "--config", "job.yaml", "--output", str(files / "run")]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DISTILL_CACHE": str(files / ".cache")}
    result = run_distributed(command, clean=files / "run", timeout=300, cwd=files, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((files / "run" / "metrics.json").read_text())
    saved = torch.load(files / "run" / "checkpoints" / "checkpoint.pt", weights_only=True)
    assert saved["signature"]["processes"] == 2 and saved["state"]["step"] == 2  # 4 batches shared by 2 processes
    # all-linear: c_attn (32 -> 96), attn.c_proj (32 -> 32), c_fc (32 -> 128), mlp.c_proj (128 -> 32); not lm_head
    assert metrics["parameters"]["trainable"] == 4 * (32 + 96) + 4 * (32 + 32) + 4 * (32 + 128) + 4 * (128 + 32)
    merged = AutoModelForCausalLM.from_pretrained(files / "run" / "student")
    original = AutoModelForCausalLM.from_pretrained(files / "student")
    weight = "transformer.h.0.attn.c_attn.weight"
    assert not torch.equal(merged.state_dict()[weight], original.state_dict()[weight])
    assert adapter_computes_the_merged_student(files / "student", files / "run" / "student")
    resumed = run_distributed(command + ["--resume"], timeout=300, cwd=files, env=env)  # finished: saved again
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    again = AutoModelForCausalLM.from_pretrained(files / "run" / "student")
    assert torch.equal(again.state_dict()[weight], merged.state_dict()[weight])


class Ids:
    """The service's Resolver without its store: each id stands for a folder named after it."""

    def model(self, value, field, expect):
        return f"/data/jobs/{value}/output/student"

    def file(self, value, field):
        return f"/data/files/{value}"


def test_the_service_resolves_and_guards_a_student_given_with_lora(tmp_path):
    from distill.service import db, kinds, refs
    from distill.service.errors import ServiceError
    from distill.service.refs import Resolver
    from distill.service.settings import Settings

    raw = {"student": {"model": "job-" + "1" * 24, "lora": LORA}, "data": "file-" + "2" * 24}
    resolved = refs.resolve(LMJobConfig, raw, Ids(), models="hf")  # type: ignore[arg-type]
    assert resolved["student"] == {"model": f"/data/jobs/job-{'1' * 24}/output/student", "lora": LORA}
    plain = refs.resolve(LMJobConfig, {**raw, "student": "job-" + "1" * 24}, Ids(), models="hf")  # type: ignore[arg-type]
    assert plain["student"] == resolved["student"]["model"]
    settings = Settings(data_dir=tmp_path / "data").prepare()
    engine = db.open_engine(settings.url)
    db.ensure_schema(engine)
    for student in ({"model": "/tmp/some-model", "lora": LORA}, {"model": "../../student"}):
        with pytest.raises(ServiceError) as caught:  # a path in the mapping is refused as a plain one is
            kinds.parse("train-lm", {**raw, "student": student}, settings, Resolver(settings, engine))
        assert caught.value.status == 422 and caught.value.param == "config.student.model"
    engine.dispose()
