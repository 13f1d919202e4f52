"""`distill train-lm`: a user's causal LM student distilled from a live teacher (same tokenizer) or from a cache of
its top-k log-probs, on the user's JSONL data (or fine-tuned alone when neither is given); under `torchrun`, the
same job trains with DDP or FSDP. With `student.lora` only LoRA adapters are trained (`distill.lora`), and the
saved student is the merged model, its adapter beside it."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
from pydantic import Field

from distill import hf
from distill import report as reports
from distill.config import Length, LoraSpec, LossConfig, Strict, TopK, TrainConfig, dump
from distill.distributed import rank
from distill.errors import DistillError
from distill.lm_data import read_examples, tokenize_examples
from distill.lm_models import weights_bytes
from distill.lora import ADAPTER, parameter_counts, save_lora_student, trained_model, with_lora
from distill.model_card import write_cards
from distill.models import count_parameters
from distill.stages import RunContext, write_record
from distill.train import CHECKPOINT, TrainResult, train
from distill.train_lm_report import byte_lengths, held_out_scores, report
from distill.train_lm_teacher import lm_teacher

STUDENT_RECORD = "student.json"  # beside the checkpoint: the student it was written for
Split = Annotated[str, Field(max_length=100, pattern=r"^[\w.-]+$")]


class LMStudent(Strict):
    """The student with its settings: `student: {model: FOLDER, lora: {r: 16, ...}}`."""

    model: str = Field(max_length=1_000, description="a causal LM folder (save_pretrained) or a hub name")
    lora: LoraSpec | None = Field(
        None, description="train LoRA adapters (peft) instead of the whole student; the merged model is saved"
    )


class LMJobConfig(Strict):
    """`distill train-lm --config FILE.yaml`: a causal LM student distilled from a live teacher or a log-prob cache."""

    student: str | LMStudent = Field(
        description="the student: a causal LM folder (save_pretrained) or a hub name, or {model, lora}"
    )
    teacher: str | None = Field(None, max_length=1_000, description="a live teacher (same tokenizer); or give `cache`")
    cache: Path | None = Field(None, description="a teacher log-prob cache built by `distill cache build`")
    data: Path = Field(
        description="training data: JSONL (prompt/completion, messages, text or question/answer rows), .txt, "
        "parquet, Arrow, JSON or CSV files, a saved dataset folder, or a Hub data set org/name[:config][:split]"
    )
    data_split: Split | None = Field(None, description="the split of a saved DatasetDict folder (default train)")
    eval_data: Path | None = Field(None, description="held-out data (as `data`) for perplexity, agreement and KL")
    eval_split: Split | None = Field(None, description="the split of a saved DatasetDict folder for eval_data")
    max_length: Annotated[Length, Field(ge=8)] = Field(512, description="tokens per example (longer ones are cut)")
    loss: LossConfig = Field(default_factory=lambda: LossConfig(temperature=1.0, alpha=0.5))
    train: TrainConfig = Field(
        default_factory=lambda: TrainConfig(epochs=1, batch_size=8, lr=5e-5, schedule="cosine", checkpoint_every=200)
    )

    teacher_top_k: TopK = Field(
        64, description="a teacher with another tokenizer: its k likeliest next tokens carried to the student's"
    )
    teacher_map: Literal["exact", "prefix"] = Field(
        "exact",
        description="a teacher with another tokenizer: its tokens carried to student tokens of the same bytes, the "
        "rest to the tail (exact), or the rest to the student token of their longest byte prefix (prefix)",
    )

    def student_spec(self) -> LMStudent:
        """The student as a mapping, whichever form the config gave."""
        return LMStudent(model=self.student) if isinstance(self.student, str) else self.student


def run_train_lm(config: LMJobConfig, context: RunContext) -> dict[str, Any]:
    """Distill a causal LM from a live teacher or a cache (or fine-tune it alone when neither is given) into
    `output/student`; return the metrics (also written to metrics.json by the process of rank 0)."""
    started = time.perf_counter()
    output, store, spec = context.output, context.store, config.student_spec()
    output.mkdir(parents=True, exist_ok=True)
    tokenizer = hf.load_tokenizer(spec.model, store)
    examples = read_examples(config.data, tokenizer, split=config.data_split)
    data = tokenize_examples(tokenizer, examples, config.max_length)
    _check_same_student(output / "checkpoints", spec, context.resume)
    student: Any = hf.load_causal_lm(spec.model, store)
    taught = lm_teacher(config, tokenizer, examples, data, student.get_output_embeddings().weight.shape[0], store)
    lora_model = with_lora(student, spec.lora, seed=config.train.seed) if spec.lora is not None else None
    if lora_model is not None:
        student = trained_model(lora_model)  # the model itself, its adapters injected
    result = train(student, data, config.train, teacher=taught.source, loss=config.loss,
                   checkpoint_dir=output / "checkpoints", resume=context.resume, reporter=context.reporter,
                   name="student")  # fmt: skip
    if rank() != 0:  # one process writes; under FSDP `state_dict` holds the gathered weights
        return {"recipe": "train-lm", "history": result.history}
    directory = output / "student"
    metrics: dict[str, Any] = {"recipe": "train-lm", "history": result.history, "student": str(directory),
                               "parameters": parameter_counts(result.model), "description": _description(config, data),
                               "taught_by": _taught_by(config), "loss": config.loss.model_dump(),
                               "train": config.train.model_dump(mode="json")}  # fmt: skip
    metrics.update(_save_student(result, lora_model, spec, directory, tokenizer, store))
    metrics.update(taught.metrics())
    metrics["size_bytes"] = weights_bytes(directory)
    if config.eval_data is not None:
        examples = read_examples(config.eval_data, tokenizer, split=config.eval_split)
        held_out = tokenize_examples(tokenizer, examples, config.max_length)
        device = torch.device(config.train.device)
        teacher_held_out = None
        if taught.teacher_data is not None and taught.model is not None:  # another tokenizer: its own tokens
            teacher_held_out = tokenize_examples(taught.tokenizer, examples, config.max_length)
        lengths = (byte_lengths(tokenizer), None if taught.tokenizer is None else byte_lengths(taught.tokenizer))
        metrics["eval_models"] = held_out_scores(directory, taught.model, held_out, device, config.teacher,
                                                 teacher_data=teacher_held_out, byte_lengths=lengths)  # fmt: skip
        scores = (
            "perplexity",
            "bits_per_byte",
            "tokens",
            "kl_to_teacher",
            "agreement",
        )  # of the exported student; not its timing
        metrics["eval"] = {k: v for k, v in metrics["eval_models"]["student"].items() if k in scores}
    metrics["seconds"] = time.perf_counter() - started
    _write_report(config, metrics, output, directory)
    return metrics


def _write_report(config: LMJobConfig, metrics: dict[str, Any], output: Path, directory: Path) -> None:
    """metrics.json, report.md and report.html, config.yaml, and the student's model card."""
    rendered = report(metrics)
    reports.write(rendered, output, metrics)
    (output / "config.yaml").write_text(dump(config))
    write_cards([directory], rendered, dump(config), metrics, base_model=config.student_spec().model)


def _description(config: LMJobConfig, data: Any) -> str:
    held_out = f"; held out: {config.eval_data}" if config.eval_data is not None else ""
    return f"{config.student_spec().model} trained on {config.data} ({len(data):,} examples){held_out}."


def _taught_by(config: LMJobConfig) -> str:
    if config.teacher is not None:
        return f"the live teacher {config.teacher}"
    return f"the cache {config.cache}" if config.cache is not None else "nothing (fine-tuned alone)"


def _save_student(
    result: TrainResult, lora_model: Any, spec: LMStudent, directory: Path, tokenizer: Any, store: Path | None
) -> dict[str, Any]:
    """The trained student written to `directory` as a causal LM folder with its tokenizer (a LoRA student, given
    as its peft model, merged; its adapter in `adapter/`); what the metrics say of it."""
    whole: Any = result.model if lora_model is None else lora_model
    if result.state_dict is not None:  # trained sharded (FSDP): the gathered weights into an unsharded copy
        whole = hf.load_causal_lm(spec.model, store)
        whole = whole if spec.lora is None else with_lora(whole, spec.lora)
        (whole if spec.lora is None else trained_model(whole)).load_state_dict(result.state_dict)
    if spec.lora is not None:
        merged = save_lora_student(whole, directory, tokenizer)
        return {"params": count_parameters(merged), "adapter": str(directory / ADAPTER),
                "adapter_bytes": weights_bytes(directory / ADAPTER)}  # fmt: skip
    whole.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return {"params": count_parameters(result.model)}


def _check_same_student(checkpoints: Path, spec: LMStudent, resume: bool) -> None:
    """A resumed run's student must be the one its checkpoint holds (the model and its LoRA settings): recorded
    beside the checkpoint (by process 0) when a run starts."""
    record, wanted = checkpoints / STUDENT_RECORD, spec.model_dump(mode="json")
    if resume and record.is_file() and (checkpoints / CHECKPOINT).is_file():
        found = json.loads(record.read_text())
        if found != wanted:
            raise DistillError(
                f"the checkpoint in {checkpoints} was written for the student {json.dumps(found)}, not "
                f"{json.dumps(wanted)}; resume with the same student, or delete it to start over"
            )
    if rank() == 0:
        checkpoints.mkdir(parents=True, exist_ok=True)
        write_record(record, wanted)
